"""Does the policy read the task? A cheap check before exploring with it.

An agent whose replies do not depend on the task text cannot be improved by
exploration: every failure is the same failure. This check scores the expert's
first reply of task j after the prompt of task i, for K tasks with distinct task
texts that the model was not trained on (from `train[start:]`), giving a (K, K)
matrix of log-probabilities. Reading down column j compares one reply under every
task, so the reply's own likelihood cancels out: a model that reads the task finds
each reply most likely after its own task; one that ignores the task scores a
column nearly flat and gets about 1/K of them right by chance.

    python -m eto_ref.diagnose --model runs/main/sft/final --env science
"""

from __future__ import annotations

import argparse

import torch

from envs import make_env
from eto_ref.agent import prompt_messages
from eto_ref.eto import load_policy
from eto_ref.losses import agent_token_logprobs, sequence_logprobs


def reply_logprob(model, tokenizer, messages: list[dict], reply: str) -> float:
    """log p(reply | messages): the sum over the reply's agent tokens (those training would score)."""
    prompt, _ = tokenizer.render(messages, add_generation_prompt=True)
    full, mask = tokenizer.render(messages + [{"role": "assistant", "content": reply}])
    device = next(model.parameters()).device
    ids = torch.tensor([full], device=device)  # (1, T)
    in_reply = torch.tensor([[m and t >= len(prompt) for t, m in enumerate(mask)]], device=device)  # (1, T)
    with torch.no_grad():
        return sequence_logprobs(agent_token_logprobs(model(ids), ids, in_reply), in_reply).item()


def own_task_accuracy(scores: torch.Tensor) -> float:
    """Fraction of columns j (replies) whose largest entry is scores[j, j] (ties count as wrong)."""
    k = scores.shape[0]
    own = scores.diagonal()  # (K,)
    others = scores.masked_fill(torch.eye(k, dtype=torch.bool), float("-inf")).max(dim=0).values  # (K,)
    return (own > others).float().mean().item()


def distinct_tasks(env, start: int, k: int) -> list[str]:
    """The first k train tasks from `start` on whose task texts all differ."""
    chosen, seen = [], set()
    for task_id in env.task_ids("train")[start:]:
        text = env.expert_trajectory(task_id)["conversations"][2]["value"]
        if text not in seen:
            seen.add(text)
            chosen.append(task_id)
        if len(chosen) == k:
            break
    return chosen


def task_conditioning(model, tokenizer, env, task_ids: list[str], icl_example: bool = False) -> dict:
    """The (K, K) matrix log p(first expert reply of task j | prompt of task i) and its own-task accuracy."""
    firsts, tasks = [], []
    for task_id in task_ids:
        turns = env.expert_trajectory(task_id)["conversations"]
        tasks.append(turns[2]["value"])  # instruction, "OK", task, first reply, ...
        firsts.append(turns[3]["value"])
    example = env.icl_example() if icl_example else []
    scores = torch.tensor([[reply_logprob(model, tokenizer, prompt_messages(env.instruction, example, task), reply)
                            for reply in firsts] for task in tasks])  # (K, K)
    own_minus_others = scores.diagonal() - (scores.sum(dim=0) - scores.diagonal()) / (len(task_ids) - 1)  # (K,)
    return {"tasks": len(task_ids), "own_task_accuracy": own_task_accuracy(scores), "chance": 1 / len(task_ids),
            "own_task_gain": own_minus_others.mean().item()}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="policy model directory")
    p.add_argument("--env", default="science")
    p.add_argument("--start", type=int, default=1000, help="first train task (default 1000: past the SFT data)")
    p.add_argument("--tasks", type=int, default=20, help="K tasks (default 20)")
    p.add_argument("--icl", action="store_true", help="with the one in-context example in the prompt")
    args = p.parse_args(argv)
    env = make_env(args.env)
    model, tokenizer = load_policy(args.model, "cpu", "float32")
    ids = distinct_tasks(env, args.start, args.tasks)
    result = task_conditioning(model, tokenizer, env, ids, args.icl)
    print(f"{args.model}: {100 * result['own_task_accuracy']:.0f}% of {result['tasks']} first replies are most "
          f"likely after their own task (chance {100 * result['chance']:.0f}%); own task vs others: "
          f"{result['own_task_gain']:+.1f} nats")
    return result


if __name__ == "__main__":
    main()
