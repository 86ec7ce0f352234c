"""Throughput of training and exploration for a SmolLM2-135M model, against transformers, same run.

    python bench/throughput.py [--quick] [--threads N] [--model DIR]

Float32 on CPU, one thread count for everything, both sides of every comparison
timed alternately (a, b, a, b, ...) and the best time kept, so a noisy neighbour
slows both alike. The model is SmolLM2-135M-Instruct when its converted directory
exists (models/smollm2-135m-instruct, `python -m eto_ref.gguf`), else a random model
of its shapes; its tokenizer is the tiny model's then.

1. Training: one optimizer step (forward, backward, AdamW) of the BC loss (paper Eq. 5)
   on a batch of science expert trajectories. Baseline: transformers'
   LlamaForCausalLM with the same weights, the same masked loss and AdamW (logits at
   every position, every row running the whole sequence). Ours, then ours with each
   feature switched off: the shared prefix (the instruction every trajectory begins
   with, run once), the LM head only at the scored positions.
2. Exploration: N multi-turn science episodes (greedy). Baseline: what an agent built
   on transformers' `generate` does: every turn, the whole history of every live
   episode re-prefilled (left-padded batch), then decoded; episodes in lockstep.
   Ours (`eto_ref.agent.run_episodes`: the cache kept across turns, the shared prompt
   prefix computed once, continuous batching), then with each switched off.

Peak memory is the resident set's high-water mark above the process's size before
the case (sampled every 5 ms). The last line is
`speedup vs transformers: training X.XXx, exploration Y.YYx`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import envs  # noqa: E402
from eto_ref.agent import (STOP_STRINGS, AgentConfig, Running, agent_turn, first_prompt, run_episodes,  # noqa: E402
                           start_episode, step_limit)
from eto_ref.batches import collate_sft  # noqa: E402
from eto_ref.checkpoint import load_model, save_model  # noqa: E402
from eto_ref.losses import agent_token_logprobs, bc_loss, next_token_targets, scored_positions  # noqa: E402
from eto_ref.model import ModelConfig, Transformer, target_logprobs  # noqa: E402
from eto_ref.runtime import set_threads  # noqa: E402
from eto_ref.sampler import SamplingConfig, Session  # noqa: E402
from eto_ref.tokenizer import Tokenizer  # noqa: E402
from eto_ref.trajectory import encode_sft, parse_trajectory  # noqa: E402

SMOLLM2 = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
               num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0, tie_word_embeddings=True)


# --------------------------------------------------------------------------- measuring


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


class PeakMemory:
    """The resident set's high-water mark during a block, above its size at the start (MB)."""

    def __enter__(self):
        self.start = self.peak = rss_mb()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, rss_mb())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.extra = self.peak - self.start


def race(cases: dict, repeats: int) -> dict:
    """Best wall time and peak memory of each case, cases run alternately `repeats` times."""
    best = {name: (float("inf"), 0.0, None) for name in cases}
    for repeat in range(repeats):
        for name, fn in cases.items():
            with PeakMemory() as mem:
                start = time.perf_counter()
                result = fn()
                seconds = time.perf_counter() - start
            t, m, _ = best[name]
            best[name] = (min(t, seconds), max(m, mem.extra), result)
            print(f"  repeat {repeat + 1}/{repeats}, {name}: {seconds:.1f} s", file=sys.stderr, flush=True)
    return best


# --------------------------------------------------------------------------- the model on both sides


def our_model(model_dir: str | None, workdir: Path) -> tuple[Path, Tokenizer]:
    """A directory both libraries load: SmolLM2 if converted, else random SmolLM2 shapes + the tiny tokenizer."""
    if model_dir and (Path(model_dir) / "config.json").is_file():
        return Path(model_dir), Tokenizer.from_dir(model_dir)
    from eto_ref.tiny import environment_texts
    from eto_ref.tokenizer import train_bpe_tokenizer

    tok = train_bpe_tokenizer(environment_texts(["science"], tasks_per_env=50), 2048, workdir / "tok")
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**{**SMOLLM2, "vocab_size": tok.vocab_size}))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    return save_model(model, workdir / "model", tokenizer_dir=workdir / "tok"), tok


def hf_model(path: Path):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)


# --------------------------------------------------------------------------- 1. training step


def science_batch(tok: Tokenizer, n: int) -> dict:
    env = envs.make_env("science")
    examples = [encode_sft(parse_trajectory(env.expert_trajectory(t)), tok, 2048) for t in env.task_ids("train")[:n]]
    return collate_sft(examples, tok.pad_id)


def our_step(model, optimizer, batch: dict, shared: bool, scored_only: bool):
    def step():
        optimizer.zero_grad(set_to_none=True)
        ids, mask = batch["input_ids"], batch["loss_mask"]
        prefix = batch["shared_prefix"] if shared else 0
        if scored_only:  # the LM head at the scored positions alone: (N, V)
            targets, scored = next_token_targets(ids, mask)
            hidden = model.hidden_states(ids, batch["attention_mask"], prefix)  # (B, T, D)
            logps = target_logprobs(model.lm_head(hidden[scored_positions(mask)]), targets[scored])
        else:  # (B, T, V)
            logits = model.lm_head(model.hidden_states(ids, batch["attention_mask"], prefix))  # (B, T, V)
            logps = agent_token_logprobs(logits, ids, mask)
        loss = bc_loss(logps)
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def hf_step(model, optimizer, batch: dict):
    def step():
        optimizer.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"].long()).logits
        loss = bc_loss(agent_token_logprobs(logits, batch["input_ids"], batch["loss_mask"]))  # the same token mean
        loss.backward()
        optimizer.step()
        return loss.item()
    return step


def bench_training(path: Path, tok: Tokenizer, rows: int, repeats: int) -> tuple[list, float]:
    batch = science_batch(tok, rows)
    tokens = int(batch["attention_mask"].sum())
    ours, theirs = load_model(path).train(), hf_model(path).train()
    lr = 0.0  # the weights stay as they are: every repeat times the same step
    cases = {
        "transformers LlamaForCausalLM": hf_step(theirs, torch.optim.AdamW(theirs.parameters(), lr=lr), batch),
        "eto_ref": our_step(ours, torch.optim.AdamW(ours.parameters(), lr=lr), batch, True, True),
        "eto_ref, no shared prefix": our_step(ours, torch.optim.AdamW(ours.parameters(), lr=lr), batch, False, True),
        "eto_ref, LM head everywhere": our_step(ours, torch.optim.AdamW(ours.parameters(), lr=lr), batch, True, False),
    }
    results = race(cases, repeats)
    base = results["transformers LlamaForCausalLM"][0]
    table = [(name, tokens / t, f"{mem:.0f}", base / t) for name, (t, mem, _) in results.items()]
    print(f"training: {rows} science trajectories, {tokens} tokens, shared prefix {batch['shared_prefix']} tokens; "
          f"loss ours {results['eto_ref'][2]:.4f}, transformers "
          f"{results['transformers LlamaForCausalLM'][2]:.4f}", flush=True)
    return table, base / results["eto_ref"][0]


# --------------------------------------------------------------------------- 2. exploration


def hf_episodes(model, tok: Tokenizer, task_ids: list[str], config: AgentConfig) -> list:
    """The transformers-generate agent: every turn, re-prefill each live episode's whole history."""
    runs = []
    for task_id in task_ids:
        env, episode = start_episode(lambda: envs.make_env("science"), task_id)
        runs.append(Running(env, episode, first_prompt(env, episode, config), step_limit(env, config)))
    live = list(runs)
    while live:
        prompts = [tok.render(r.messages, add_generation_prompt=True)[0] for r in live]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[tok.pad_id] * (width - len(p)) + p for p in prompts])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=config.sampling.max_new_tokens,
                                 do_sample=False, eos_token_id=tok.stop_ids, pad_token_id=tok.pad_id,
                                 stopping_criteria=stop_strings_criteria(tok, width))
        still = []
        for run, row in zip(live, out[:, width:].tolist()):
            reply = reply_text(tok, row)
            ended = apply_reply(run, reply)
            if not ended:
                still.append(run)
        live = still
    return [r.episode for r in runs]


def stop_strings_criteria(tok: Tokenizer, width: int):
    """Stop each row of a transformers generate at the agent's stop strings, as our sampler does."""
    import transformers

    class StopStrings(transformers.StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            texts = [tok.decode(row[width:].tolist()) for row in input_ids]
            return torch.tensor([any(s in t for s in STOP_STRINGS) for t in texts])

    return transformers.StoppingCriteriaList([StopStrings()])


def reply_text(tok: Tokenizer, tokens: list[int]) -> str:
    """Decode a generated reply: up to the first stop token, cut at the first stop string."""
    for i, t in enumerate(tokens):
        if t in tok.stop_ids:
            tokens = tokens[:i]
            break
    text = tok.decode(tokens)
    cuts = [text.find(s) for s in STOP_STRINGS if s in text]
    return (text[:min(cuts)] if cuts else text).strip()


def apply_reply(run: Running, reply: str) -> bool:
    from eto_ref.agent import step_episode

    episode = run.episode
    if not reply:
        episode.turns.append({"from": "gpt", "value": reply})
        episode.steps += 1
        episode.done, episode.reason = True, "no_output"
        return True
    observation = step_episode(run.env, episode, reply, run.max_steps)
    if episode.done:
        return True
    run.messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": observation}]
    return False


def static_batches(model, tok: Tokenizer, task_ids: list[str], config: AgentConfig) -> list:
    """Ours without continuous batching: batches of episodes in lockstep, each turn waiting for its
    slowest reply, the next batch starting when the whole batch has ended."""
    episodes = []
    for i in range(0, len(task_ids), config.batch_size):
        runs, session = {}, None
        for row, task_id in enumerate(task_ids[i:i + config.batch_size]):
            env, episode = start_episode(lambda: envs.make_env("science"), task_id)
            messages = first_prompt(env, episode, config)
            if session is None:
                session = Session(model, len(task_ids[i:i + config.batch_size]), config.max_len,
                                  prefix=tok.render(messages[:-1])[0])
            session.start(row, tok.render(messages, add_generation_prompt=True)[0])
            runs[row] = Running(env, episode, messages, step_limit(env, config))
        live = sorted(runs)
        while live:
            outs = session.generate(config.sampling, tok.stop_ids, STOP_STRINGS, tok.decode, rows=live)
            live = [row for row, out in zip(live, outs)
                    if not agent_turn(session, tok, row, runs[row], out.text.strip(), out.reason)]
        episodes += [runs[r].episode for r in sorted(runs)]
    return episodes


class NoPrefixSession(Session):
    """A Session that ignores its shared prefix: every prompt is prefilled whole."""

    def __init__(self, *args, prefix=(), **kwargs):
        super().__init__(*args, **kwargs)


class FullLogitsSession(Session):
    """A Session whose prefill computes the LM head at every position (then keeps the last)."""

    def _prefill(self, rows):
        model = self.model

        def every_position(ids, attention_mask, kv_cache, last):
            position_ids, mask = kv_cache.begin(attention_mask.bool())  # (b, T), (b, T, S)
            logits = model.lm_head(model.decoder(ids, position_ids, mask, kv_cache))  # (b, T, V)
            return logits[torch.arange(len(ids)), last]  # (b, V)
        model.next_token_logits = every_position
        try:
            return super()._prefill(rows)
        finally:
            del model.next_token_logits


def with_session(cls, fn):
    import eto_ref.agent as agent_module

    def run():
        old = agent_module.Session
        agent_module.Session = cls
        try:
            return fn()
        finally:
            agent_module.Session = old
    return run


def bench_exploration(path: Path, tok: Tokenizer, episodes: int, config: AgentConfig, repeats: int):
    ours, theirs = load_model(path).eval(), hf_model(path).eval()
    tasks = envs.make_env("science").task_ids("test_seen")[:episodes]

    def run_ours():
        return run_episodes(ours, tok, lambda: envs.make_env("science"), tasks, config)
    cases = {
        "transformers generate, history re-prefilled": lambda: hf_episodes(theirs, tok, tasks, config),
        "eto_ref": run_ours,
        "eto_ref, no shared prefix": with_session(NoPrefixSession, run_ours),
        "eto_ref, no continuous batching": lambda: static_batches(ours, tok, tasks, config),
        "eto_ref, LM head everywhere in prefill": with_session(FullLogitsSession, run_ours),
    }
    results = race(cases, repeats)
    base = results["transformers generate, history re-prefilled"][0]
    same = sum(a.record() == b.record() for a, b in zip(results["eto_ref"][2],
                                                       results["transformers generate, history re-prefilled"][2]))
    turns = sum(e.steps for e in results["eto_ref"][2])
    print(f"exploration: {episodes} science episodes, {turns} agent turns, batch {config.batch_size}, "
          f"max {config.sampling.max_new_tokens} new tokens per reply; trajectories identical to the "
          f"transformers agent's: {same} of {episodes}", flush=True)
    table = [(name, 60 * episodes / t, f"{mem:.0f}", base / t) for name, (t, mem, _) in results.items()]
    return table, base / results["eto_ref"][0]


def print_table(title: str, unit: str, rows: list) -> None:
    print(f"\n{title}\n")
    print(f"| case | {unit} | peak memory above start, MB | speed vs the transformers baseline |")
    print("|---|---:|---:|---:|")
    for name, rate, mem, ratio in rows:
        print(f"| {name} | {rate:.2f} | {mem} | {ratio:.2f}x |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smaller sizes, one repeat (finishes within 5 minutes)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for both sides (default: all cores)")
    p.add_argument("--model", default="models/smollm2-135m-instruct", help="model directory (else random weights)")
    args = p.parse_args(argv)
    threads = set_threads(args.threads)
    rows, episodes, repeats = (4, 6, 1) if args.quick else (8, 32, 2)
    config = AgentConfig(sampling=SamplingConfig(max_new_tokens=48 if args.quick else 96),
                         batch_size=6 if args.quick else 16, icl=False, max_steps=4 if args.quick else 10)
    with tempfile.TemporaryDirectory() as tmp:
        path, tok = our_model(args.model, Path(tmp))
        print(f"torch {torch.__version__}, {threads} threads, float32, CPU; model {path} "
              f"({'SmolLM2-135M-Instruct' if path == Path(args.model) else 'random weights, SmolLM2 shapes'})",
              flush=True)
        train_rows, train_speedup = bench_training(path, tok, rows, repeats)
        explore_rows, explore_speedup = bench_exploration(path, tok, episodes, config, repeats)
    print_table("training step (tokens/s)", "tokens/s", train_rows)
    print_table("exploration (episodes/min)", "episodes/min", explore_rows)
    print(f"\nspeedup vs transformers: training {train_speedup:.2f}x, exploration {explore_speedup:.2f}x")


if __name__ == "__main__":
    main()
