"""A self-contained HTML report of a main-job run: what ETO did, to be looked at.

    python -m eto_ref.report runs/main          # -> runs/main/report.html (also written by --stage all)

One file, no network, no JavaScript. It shows:

1. the results table in the paper's shape, each value with its standard error over tasks;
2. average reward per ETO iteration (0 = SFT) per split, with RFT and Best-of-N as
   reference lines, error bars of one standard error, a 0-100 axis;
3. one training trajectory token by token with the loss mask: instruction and
   observation tokens grey, agent tokens highlighted, end-of-turn tokens marked; what
   BC and DPO train on is exactly the highlighted tokens;
4. one preference pair after DPO: every agent turn of the chosen and the rejected side
   with its log-ratio log pi(turn) - log ref(turn), side by side from where they diverge;
5. training curves from metrics.jsonl (SFT loss; DPO loss, margin, pair accuracy);
6. how episodes ended and the share of replies without a parsable action, per method.

The plots are hand-written SVG (eto_ref/svg.py).
"""

from __future__ import annotations

import argparse
import html
import json
import math
from pathlib import Path

import torch

from eto_ref.checkpoint import load_model
from eto_ref.jsonl import read_jsonl_records, write_text_atomic
from eto_ref.losses import token_logprobs
from eto_ref.results import per_task_rewards, phase_folders
from eto_ref.svg import line_chart, point_chart
from eto_ref.tokenizer import Tokenizer
from eto_ref.trajectory import encode_pair, load_pairs, load_trajectories

STYLE = """
body { font-family: sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.5em 0; } td, th { border: 1px solid #ccc; padding: 4px 8px; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.tokens { font-family: monospace; line-height: 1.9; white-space: pre-wrap; border: 1px solid #ddd; padding: 8px; }
.tok { border-radius: 2px; padding: 1px 0; }
.masked { color: #999; }
.agent { background: #cde8ff; color: #000; }
.eot { background: #ffb347; color: #000; font-weight: bold; }
.legend span { margin-right: 1.5em; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.turn { border: 1px solid #ddd; margin: 4px 0; padding: 4px 6px; font-family: monospace; white-space: pre-wrap; }
.shared { opacity: 0.55; }
.up { border-left: 6px solid #2ca02c; } .down { border-left: 6px solid #d62728; }
.note { color: #555; font-size: 0.9em; }
"""


# --------------------------------------------------------------------------- numbers from the run directory


def mean_and_se(rewards: dict[str, float]) -> tuple[float, float]:
    """Average reward x100 over tasks and its standard error (sd / sqrt(n))."""
    values = [100 * r for r in rewards.values()]
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, sd / math.sqrt(n)


def method_stats(run: Path, splits) -> dict[str, dict[str, tuple[float, float, int]]]:
    """method -> split -> (mean, standard error, tasks), from the finished evaluations' trajectories."""
    return {method: {split: (*mean_and_se(tasks), len(tasks)) for split, tasks in by_split.items() if tasks}
            for method, by_split in per_task_rewards(run, splits).items()}


def splits_of(run: Path) -> tuple[str, ...]:
    cfg = json.loads((run / "pipeline_config.json").read_text())
    return (("valid",) if cfg["loop"]["valid"] else ()) + ("test_seen", "test_unseen")


# --------------------------------------------------------------------------- sections


def results_section(stats: dict, splits) -> str:
    rows = "".join(
        f"<tr><td>{html.escape(m)}</td>" + "".join(
            f"<td class='num'>{by[s][0]:.1f} ± {by[s][1]:.1f}</td>" if s in by else "<td>-</td>" for s in splits)
        + "</tr>" for m, by in stats.items())
    head = "".join(f"<th>{s}</th>" for s in splits)
    return (f"<h2>Results: average reward x100 (± one standard error over tasks)</h2>"
            f"<table><tr><th>method</th>{head}</tr>{rows}</table>")


def reward_plot_section(stats: dict, splits) -> str:
    """Reward per ETO iteration (0 = SFT), one series per split; RFT and Best-of-N as reference bands."""
    iterations = ["SFT"] + sorted((m for m in stats if m.startswith("ETO-iter-")), key=lambda m: int(m.split("-")[-1]))
    series = {s: [(i, stats[m][s][0], stats[m][s][1]) for i, m in enumerate(iterations) if s in stats.get(m, {})]
              for s in splits}
    references = {f"{m}, {s}": stats[m][s][:2] for m in stats if m not in iterations for s in splits
                  if s in stats[m]}
    svg = point_chart(series, references, x_labels=[str(i) for i in range(len(iterations))],
                      x_title="ETO iteration (0 = SFT)", y_title="average reward x100", y_range=(0, 100))
    return f"<h2>Reward per iteration</h2>{svg}<p class='note'>Error bars: one standard error over tasks. " \
           "Dashed: the baselines, which are not iterative.</p>"


def token_spans(tokenizer: Tokenizer, ids: list[int], mask: list[bool]) -> str:
    """One span per token: grey when masked out, highlighted when trained on, orange for end-of-turn."""
    out = []
    for token, trained in zip(ids, mask):
        text = html.escape(tokenizer.decode([token]))
        kind = "eot" if token == tokenizer.end_of_turn_id and trained else ("agent" if trained else "masked")
        out.append(f"<span class='tok {kind}' title='id {token}'>{text}</span>")
    return "".join(out)


def trajectory_section(tokenizer: Tokenizer, data: Path) -> str:
    traj = load_trajectories(data)[0]
    ids, mask = tokenizer.render(traj.messages)
    agent = sum(mask)
    legend = ("<p class='legend'><span class='tok masked'>instruction, task, observations: masked</span>"
              "<span class='tok agent'>agent tokens: trained on</span>"
              "<span class='tok eot'>end of turn: trained on</span></p>")
    return (f"<h2>What BC and DPO train on: one expert trajectory, token by token</h2>{legend}"
            f"<p class='note'>{html.escape(traj.id)}: {len(ids)} tokens, {agent} of them agent tokens "
            f"({100 * agent / len(ids):.0f}%).</p><div class='tokens'>{token_spans(tokenizer, ids, mask)}</div>")


def turn_logprobs(model, tokenizer: Tokenizer, messages: list[dict], prompt_len: int) -> list[float]:
    """log p(agent turn) of each assistant turn after the prompt: sums of its tokens' log-probs."""
    ids, mask = tokenizer.render(messages)
    mask = [m and i >= prompt_len for i, m in enumerate(mask)]
    t_ids = torch.tensor([ids])
    with torch.no_grad():
        per_token = token_logprobs(model(t_ids), t_ids, torch.tensor([mask]))[0].tolist()  # (T-1,)
    turns, current, previous = [], 0.0, False
    for i, m in enumerate(mask[1:]):  # target i + 1
        if m:
            current += per_token[i]
        elif previous:
            turns.append(current)
            current = 0.0
        previous = m
    if previous:
        turns.append(current)
    return turns


def pair_section(run: Path, tokenizer: Tokenizer) -> str:
    """One pair of iteration 1, each agent turn with log pi - log ref (pi: after DPO, ref: the SFT policy)."""
    it = run / "eto" / "iter-1"
    pairs_file, final = it / "explore" / "pairs.json", it / "dpo" / "final"
    if not pairs_file.is_file() or not final.is_dir():
        return "<h2>A preference pair after DPO</h2><p>No DPO run yet.</p>"
    pair = min(load_pairs(pairs_file), key=lambda p: len(p.chosen) + len(p.rejected))  # a short one: readable
    reference = json.loads((final / "trainer_state.json").read_text())["config"]["model"]
    prompt_len = encode_pair(pair, tokenizer, 10**9).prompt_len
    policy, ref = load_model(final).eval(), load_model(reference).eval()
    columns = []
    for name, side in (("chosen", pair.chosen), ("rejected", pair.rejected)):
        messages = pair.prompt + side
        ratios = [a - b for a, b in zip(turn_logprobs(policy, tokenizer, messages, prompt_len),
                                        turn_logprobs(ref, tokenizer, messages, prompt_len))]
        other = pair.rejected if name == "chosen" else pair.chosen
        turns, k = [], 0
        for i, message in enumerate(side):
            if message["role"] != "assistant":
                continue
            shared = i < len(other) and other[i] == message  # before the two sides diverge
            ratio = ratios[k]
            k += 1
            cls = "shared" if shared else ("up" if ratio > 0 else "down")
            turns.append(f"<div class='turn {cls}'><b>{ratio:+.2f} nats</b>\n{html.escape(message['content'])}</div>")
        columns.append(f"<div><h3>{name} ({'expert' if name == 'chosen' else 'explored'})</h3>{''.join(turns)}</div>")
    return ("<h2>A preference pair after DPO: log pi(turn) - log ref(turn) of each agent turn</h2>"
            f"<p class='note'>Pair {html.escape(pair.id)}. Green: DPO made the turn more likely than the reference "
            "(the SFT policy) did, red: less likely; faded: turns both sides share, before they diverge.</p>"
            f"<div class='pair'>{''.join(columns)}</div>")


def curves_section(run: Path) -> str:
    charts = []
    sft = [r for r in read_jsonl_records(run / "sft" / "metrics.jsonl") if "loss" in r]
    if sft:
        charts.append(line_chart({"SFT loss": [(r["step"], r["loss"]) for r in sft]}, "step", "BC loss (Eq. 5)"))
    for folder in sorted(run.glob("eto/iter-*/dpo")):
        dpo = [r for r in read_jsonl_records(folder / "metrics.jsonl") if "loss" in r]
        if dpo:
            k = folder.parent.name
            charts.append(line_chart({f"{k} DPO loss": [(r["step"], r["dpo_loss"]) for r in dpo],
                                      f"{k} margin": [(r["step"], r["margin"]) for r in dpo]},
                                     "step", "DPO loss (Eq. 7), reward margin"))
            charts.append(line_chart({f"{k} pair accuracy": [(r["step"], r["accuracy"]) for r in dpo]},
                                     "step", "chosen reward > rejected", y_range=(0, 1)))
    return "<h2>Training curves (metrics.jsonl)</h2>" + "".join(charts)


def endings_section(run: Path, splits) -> str:
    rows = []
    for method, folder in phase_folders(run).items():
        for split in splits:
            summary = folder / f"eval-{split}" / "summary.json"
            if summary.is_file():
                s = json.loads(summary.read_text())
                reasons = ", ".join(f"{k} {v}" for k, v in sorted(s["end_reasons"].items()))
                rows.append(f"<tr><td>{html.escape(method)}</td><td>{split}</td><td>{html.escape(reasons)}</td>"
                            f"<td class='num'>{s['invalid_format_rate']:.1f}%</td>"
                            f"<td class='num'>{percent(s.get('unmatched_action_rate'))}</td>"
                            f"<td class='num'>{s['mean_steps']:.1f}</td></tr>")
    return ("<h2>How episodes ended</h2><table><tr><th>method</th><th>split</th><th>end reasons (episodes)</th>"
            "<th>replies without an action</th><th>actions the environment could not match</th>"
            "<th>mean steps</th></tr>" + "".join(rows) + "</table>")


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}%"


# --------------------------------------------------------------------------- the page


def build_report(run: str | Path) -> Path:
    """Write RUN/report.html from what the run directory holds now."""
    run = Path(run)
    splits = splits_of(run)
    tokenizer = Tokenizer.from_dir(run / "sft" / "final")
    stats = method_stats(run, splits)
    sections = [results_section(stats, splits), reward_plot_section(stats, splits),
                trajectory_section(tokenizer, run / "data" / "sft.json"), pair_section(run, tokenizer),
                curves_section(run), endings_section(run, splits)]
    cfg = json.loads((run / "pipeline_config.json").read_text())
    title = f"ETO on {cfg['loop']['env']}: {cfg['model']}, seed {cfg['seed']}"
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{''.join(sections)}</body></html>\n")
    return write_text_atomic(page, run / "report.html")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a main-job run directory (python train.py --stage all --out RUN)")
    args = p.parse_args(argv)
    print(f"wrote {build_report(args.run)}")


if __name__ == "__main__":
    main()
