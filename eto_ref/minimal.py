"""ETO in one file, top to bottom (Song et al., ACL 2024, Algorithm 1).

    python -m eto_ref.minimal                                   # SmolLM2 on the science tasks
    python -m eto_ref.minimal --model tiny --sft-tasks 16 ...   # the 4M model, for a quick look

The whole method, with nothing else around it:
    1. behavioral cloning (SFT) on expert trajectories                     paper Eq. 5
    2. exploration: the SFT policy runs the training tasks, turn by turn   paper Sec. 3.2
    3. pairs: each failure is paired with the expert trajectory            the official pair rule
    4. DPO against the policy as it was before (the reference)             paper Eq. 7
    5. evaluation of SFT and ETO on the test splits, and their difference

It uses the library's model, tokenizer and chat template (with the agent-token
mask), losses, pair-rule helpers, environments and batched generation, and leaves
out everything a long run needs: resume, presets, logging, distributed training,
the shared-prefix forward, logits only where scored, the cross-turn KV cache and
continuous batching. `python train.py --stage all` is the same method with all of
those (eto_ref/pipeline.py); this file is the one to read first.
"""

from __future__ import annotations

import argparse
import math

import torch

import envs
from envs.base import observation_turn
from eto_ref.agent import STOP_STRINGS, invalid_format_turn, parse_action
from eto_ref.batches import collate_pairs, collate_sft, split_chosen_rejected
from eto_ref.checkpoint import load_model
from eto_ref.losses import agent_token_logprobs, bc_loss, dpo_loss, sequence_logprobs
from eto_ref.models import resolve_model
from eto_ref.pairs import INSTRUCTION_TURNS, count_agent_turns, strip_trailing_observation, truncate_agent_turns
from eto_ref.results import paired_difference
from eto_ref.runtime import autocast, compute_dtype, resolve_device
from eto_ref.sampler import SamplingConfig, generate
from eto_ref.tokenizer import Tokenizer
from eto_ref.trajectory import ROLES, encode_pair, encode_sft, parse_pair, parse_trajectory


# --------------------------------------------------------------------------- 1. SFT (paper Eq. 5)


def sft_loss(model, batch: dict) -> torch.Tensor:
    """L_SFT = -(1/N) sum log pi(a_t | history) over the N agent tokens of the batch (token mean)."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (B, T, V)
    agent_logps = agent_token_logprobs(logits, batch["input_ids"], batch["loss_mask"])  # (N,): the label shift, once
    return bc_loss(agent_logps)


def lr_at(step: int, total: int, peak: float, warmup: float, schedule: str) -> float:
    """Linear warmup over the first `warmup` fraction of the steps, then constant or cosine to 0."""
    warm = math.ceil(warmup * total)
    if step < warm:
        return peak * (step + 1) / warm
    if schedule == "constant":
        return peak
    progress = (step - warm) / max(1, total - warm)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def train(model, examples: list, loss_of_batch, args, lr: float, epochs: int, schedule: str, warmup: float,
          name: str) -> None:
    """The training loop of both stages: shuffle, batch, loss, backward, clip, step."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = math.ceil(len(examples) / args.batch_size)
    total, step = epochs * steps_per_epoch, 0
    for epoch in range(epochs):
        order = torch.randperm(len(examples), generator=generator).tolist()
        for i in range(0, len(order), args.batch_size):
            batch_ids = order[i:i + args.batch_size]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, lr, warmup, schedule)
            with autocast(args.device, args.dtype):
                loss = loss_of_batch(batch_ids)
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            print(f"{name} step {step}/{total}: loss {loss.item():.4f}, grad norm {grad_norm.item():.2f}")
    model.eval()


# --------------------------------------------------------------------------- 2. the agent, turn by turn


def run_episodes(model, tok: Tokenizer, args, task_ids: list[str]) -> list[dict]:
    """One episode per task, `args.agent_batch` tasks at a time; official ETO records with rewards."""
    records = []
    for i in range(0, len(task_ids), args.agent_batch):
        records += play_side_by_side(model, tok, args, task_ids[i:i + args.agent_batch])
    return records


@torch.no_grad()
def play_side_by_side(model, tok: Tokenizer, args, task_ids: list[str]) -> list[dict]:
    """Play the tasks' episodes together, turn by turn.

    Each turn: render every running conversation with the chat template, generate
    the replies as one batch (greedy, stop at "\\nObservation:"), parse each reply's
    action, step its environment, append the observation. An unparseable reply gets
    the "Invalid format" observation and the episode goes on, as in the official code.
    """
    episodes = []
    for task_id in task_ids:
        env = envs.make_env(args.env)
        task = env.reset(task_id)
        messages = [{"role": "user", "content": env.instruction}, {"role": "assistant", "content": "OK"},
                    {"role": "user", "content": task}]  # the 0-shot prompt training used
        episodes.append({"id": task_id, "env": env, "messages": messages, "reward": 0.0, "done": False})
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=args.max_new_tokens)
    for turn in range(args.max_steps):
        running = [e for e in episodes if not e["done"]]
        if not running:
            break
        prompts = [tok.render(e["messages"], add_generation_prompt=True)[0] for e in running]  # token ids
        with autocast(args.device, args.dtype):
            replies = generate(model, prompts, greedy, stop_ids=tok.stop_ids, stop_strings=STOP_STRINGS,
                               decode=tok.decode)
        for episode, reply in zip(running, replies):
            env, text = episode["env"], reply.text.strip()
            action = parse_action(text)  # "Thought: ...\nAction: open door" -> "open door"
            if action is None:
                observation, done = invalid_format_turn(env), False
            else:
                obs, episode["reward"], done, _ = env.step(action)
                observation = observation_turn(obs, env.observation_prefix)
            episode["messages"] += [{"role": "assistant", "content": text}, {"role": "user", "content": observation}]
            episode["done"] = done or turn + 1 >= env.max_steps
    from_role = {role: name for name, role in ROLES.items()}
    return [{"id": e["id"], "reward": float(e["reward"]),
             "conversations": [{"from": from_role[m["role"]], "value": m["content"]} for m in e["messages"]]}
            for e in episodes]


# --------------------------------------------------------------------------- 3. pairs (the official rule)


def make_pair(expert: dict, explored: dict, extra_turns: int | None = 5) -> dict | None:
    """Explored worse than the expert: chosen = expert, rejected = explored (cut to the expert's agent turns
    + `extra_turns`; None keeps it whole). Better: the other way round. Equal: no pair."""
    r_expert, r = float(expert["reward"]), float(explored["reward"])
    if r == r_expert:
        return None
    expert_turns = strip_trailing_observation(expert["conversations"][INSTRUCTION_TURNS:])  # task, a1, o1, ..., an
    explored_turns = strip_trailing_observation(explored["conversations"][INSTRUCTION_TURNS:])
    if r < r_expert:
        chosen, rejected = expert_turns, explored_turns
        if extra_turns is not None:
            limit = count_agent_turns(expert_turns) + extra_turns
            rejected = strip_trailing_observation(truncate_agent_turns(rejected, limit))
    else:
        chosen, rejected = explored_turns, expert_turns
    pair = {"id": str(expert["id"]), "prompt": expert["conversations"][:INSTRUCTION_TURNS] + chosen[:1],
            "chosen": chosen[1:], "rejected": rejected[1:]}
    for side in ("chosen", "rejected"):  # each side must end with an agent turn
        if not pair[side] or pair[side][-1]["from"] != "gpt":
            return None
    return pair


# --------------------------------------------------------------------------- 4. DPO (paper Eq. 7)


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(e) of both sides: the SUM over every agent token after the shared prompt -> (b,), (b,)."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"])  # (2b, T, V)
    agent_logps = agent_token_logprobs(logits, batch["input_ids"], batch["loss_mask"])  # (N,)
    logps = sequence_logprobs(agent_logps, batch["loss_mask"])  # (2b,): chosen rows, then rejected
    return split_chosen_rejected(logps)


@torch.no_grad()
def reference_logps(model, examples: list, pad_id: int, args) -> torch.Tensor:
    """log ref(e_w), log ref(e_l) of every pair, once, before DPO changes the policy: (N, 2)."""
    model.eval()
    out = []
    for i in range(0, len(examples), args.batch_size):
        batch = to_device(collate_pairs(examples[i:i + args.batch_size], pad_id), args.device)  # (2b, T)
        with autocast(args.device, args.dtype):
            chosen, rejected = pair_logps(model, batch)
        out.append(torch.stack([chosen, rejected], dim=1).float())  # (b, 2)
    return torch.cat(out)


def dpo_batch_loss(model, batch: dict, ref: torch.Tensor, beta: float):
    """-log sigmoid(beta * [(log pi(e_w) - log ref(e_w)) - (log pi(e_l) - log ref(e_l))]), mean over pairs."""
    chosen, rejected = pair_logps(model, batch)  # (b,), (b,)
    return dpo_loss(chosen.float(), rejected.float(), ref[:, 0], ref[:, 1], beta)


# --------------------------------------------------------------------------- 5. ETO


def evaluate(model, tok, args, name: str) -> dict[str, list[dict]]:
    results = {}
    for split in ("test_seen", "test_unseen"):
        tasks = envs.make_env(args.env).task_ids(split)[:args.eval_tasks]
        results[split] = run_episodes(model, tok, args, tasks)
        print(f"{name} on {split}: {average(results[split]):.1f}")
    return results


def average(records: list[dict]) -> float:
    return 100 * sum(r["reward"] for r in records) / len(records)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    args.device = resolve_device("auto")
    args.dtype = compute_dtype(args.dtype, args.device)  # bfloat16 autocast where the CPU or GPU has it
    model_dir = resolve_model(args.model)
    model, tok = load_model(model_dir, device=args.device), Tokenizer.from_dir(model_dir)  # float32 weights
    env = envs.make_env(args.env)
    train_tasks = env.task_ids("train")
    experts = {t: env.expert_trajectory(t) for t in train_tasks[:max(args.sft_tasks, args.explore_tasks)]}

    # 1. SFT on the first sft_tasks expert trajectories
    sft_examples = [encode_sft(parse_trajectory(experts[t]), tok, args.max_len) for t in train_tasks[:args.sft_tasks]]

    def sft_batch_loss(ids: list[int]) -> torch.Tensor:
        return sft_loss(model, to_device(collate_sft([sft_examples[i] for i in ids], tok.pad_id), args.device))

    train(model, sft_examples, sft_batch_loss, args, args.sft_lr, args.sft_epochs, "cosine", 0.03, "SFT")
    sft_results = evaluate(model, tok, args, "SFT")

    # 2-3. explore the training tasks with the SFT policy; pair its failures (and wins) with the expert
    explored = run_episodes(model, tok, args, train_tasks[:args.explore_tasks])
    extra_turns = 5 if env.truncate_rejected else None  # the official code keeps ALFWorld's failed runs whole
    pairs = [p for r in explored if (p := make_pair(experts[r["id"]], r, extra_turns)) is not None]
    print(f"explored {len(explored)} tasks: average {average(explored):.1f}, {len(pairs)} pairs")
    if not pairs:
        print("no pairs: the SFT policy ties the expert on every explored task, so there is nothing to learn")
        return {"SFT": sft_results, "pairs": pairs}

    # 4. DPO: the reference is the policy as it is now, its log-probs computed once
    pair_examples = [encode_pair(parse_pair(p), tok, args.max_len) for p in pairs]
    ref = reference_logps(model, pair_examples, tok.pad_id, args)  # (N, 2)

    def dpo_batch(ids: list[int]) -> torch.Tensor:
        batch = to_device(collate_pairs([pair_examples[i] for i in ids], tok.pad_id), args.device)
        out = dpo_batch_loss(model, batch, ref[ids], args.beta)
        print(f"  margin {out.margin.item():+.3f}, pair accuracy {out.accuracy.item():.2f}")
        return out.loss

    train(model, pair_examples, dpo_batch, args, args.dpo_lr, args.dpo_epochs, "constant", 0.1, "DPO")
    eto_results = evaluate(model, tok, args, "ETO")

    # 5. SFT against ETO, task by task
    print("\n| split | SFT | ETO | ETO - SFT (paired, ± SE) |\n|---|---:|---:|---|")
    for split in sft_results:
        diff = paired_difference({r["id"]: [r["reward"]] for r in eto_results[split]},
                                 {r["id"]: [r["reward"]] for r in sft_results[split]})
        gap = "-" if diff is None else f"{diff['mean']:+.1f} ± {diff['se']:.1f}"
        print(f"| {split} | {average(sft_results[split]):.1f} | {average(eto_results[split]):.1f} | {gap} |")
    return {"SFT": sft_results, "ETO": eto_results, "pairs": pairs}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2", help="smollm2 | tiny | a Hugging Face model directory")
    p.add_argument("--env", default="science", help="science | household | webshop")
    p.add_argument("--sft-tasks", type=int, default=96, help="expert trajectories for SFT: train[:N]")
    p.add_argument("--explore-tasks", type=int, default=192, help="training tasks explored: train[:N]")
    p.add_argument("--eval-tasks", type=int, default=50, help="tasks per test split")
    p.add_argument("--sft-epochs", type=int, default=2)
    p.add_argument("--sft-lr", type=float, default=2e-4)
    p.add_argument("--dpo-epochs", type=int, default=3)
    p.add_argument("--dpo-lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--batch-size", type=int, default=8, help="sequences (SFT) or pairs (DPO) per step")
    p.add_argument("--max-len", type=int, default=2048, help="tokens per training sequence")
    p.add_argument("--max-steps", type=int, default=40, help="cap on an episode's turns")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens per reply")
    p.add_argument("--agent-batch", type=int, default=16, help="episodes played side by side")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 where the hardware has it) | float32 | bfloat16")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    main()
