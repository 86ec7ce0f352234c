"""What a policy did, read from its episodes and pairs: webshop purchases replayed, and where failed runs
part from the expert's. The tables of `python -m eto_ref.results purchases` and `... pairs`.

    purchases_table([Path("runs/valid-sft"), Path("runs/valid-dpo")])    # webshop: what each purchase missed
    pairs_table([Path("runs/explore-1/pairs.json")])                     # where the failed sides part
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import envs
from envs.webshop import unmet_requirements
from eto_ref.agent import parse_action
from eto_ref.exploration import TRAJECTORIES, action_key, agent_replies
from eto_ref.jsonl import read_jsonl_records
from eto_ref.trajectory import load_pairs


SHORTFALLS = ("never bought", "price", "option", "attribute", "type")


def replay_purchase(env, record: dict) -> dict:
    """Webshop: replay one episode's actions in `env`; what its purchase missed and which product it opened first.

    "missed": envs.webshop.unmet_requirements of the purchase (["never bought"] if nothing was
    bought; [] if exact). "first_rank": the search rank of the first product page opened (0: the
    top result; None: none opened). "first_fits": whether that product meets what the results page
    shows of it: the type, the requested attributes (its title) and the price cap. "first_left":
    whether the episode went back from that product's page (`< Prev`, `Back to Search`) before buying,
    as the expert does when the product lacks a requested option.

    The replay is exact: the shop is a pure function of the task id, and the agent stepped
    the environment with each parsable action of its replies, in order (eto_ref.agent).
    """
    env.reset(record["id"])
    goal, first, left = env.task["goal"], None, False
    for reply in agent_replies(record):
        action = parse_action(reply)
        if action is None:
            continue
        done = env.step(action)[2]
        if first is None and env.page == "product":
            first = env.product
        left = left or (first is not None and env.page != "product" and not done)
        if done:
            break
    missed = ["never bought"] if env.purchase is None else unmet_requirements(goal, *env.purchase)
    if first is None:
        return {"missed": missed, "first_rank": None, "first_fits": None, "first_left": None}
    listed = unmet_requirements(goal, first, selected=goal["options"])  # the options are not on the results page
    return {"missed": missed, "first_rank": env.results.index(first), "first_fits": not listed, "first_left": left}


def replay_folder(env, path: Path) -> list[dict]:
    """replay_purchase of every episode in a trajectories file; ValueError naming the file and record
    for one that is not a webshop episode."""
    replays = []
    for i, record in enumerate(read_jsonl_records(path), 1):
        try:
            replays.append(replay_purchase(env, record))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: record {i} ({record.get('id')!r}): not a webshop episode ({e})") from None
    return replays


def purchases_table(folders: list[Path]) -> str:
    """One row per webshop evaluation folder: % of episodes whose purchase missed each kind of
    requirement (an episode can miss several), % exact, and the first product each episode opened:
    % the top search result, % one that fits, % went back from it. Where the partial reward is lost, and
    whether the policy picks products by reading them or by their place on the page."""
    lines = ["| run | episodes | exact % | " + " | ".join(f"{k} missed %" if k != "never bought" else "never bought %"
                                                        for k in SHORTFALLS)
             + " | first product opened: the top result % | first product opened fits % | went back from it % |",
             "|---|---:|---:|" + "---:|" * (len(SHORTFALLS) + 3)]
    env = envs.make_env("webshop")
    for folder in folders:
        replays = replay_folder(env, folder / TRAJECTORIES)
        share = lambda hit: 100 * sum(map(hit, replays)) / max(len(replays), 1)  # noqa: E731
        cells = [share(lambda r: not r["missed"])] + [share(lambda r, k=k: k in r["missed"]) for k in SHORTFALLS]
        cells += [share(lambda r: r["first_rank"] == 0), share(lambda r: bool(r["first_fits"])),
                  share(lambda r: bool(r["first_left"]))]
        lines.append(f"| {folder} | {len(replays)} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
    return "\n".join(lines)


def pair_actions(messages: list[dict]) -> list[str]:
    """The parsable actions of one side of a preference pair, in order."""
    return [a for m in messages if m["role"] == "assistant" and (a := parse_action(m["content"])) is not None]


def parting_action(chosen: list[str], rejected: list[str]) -> int | None:
    """The number (from 1) of the first action where the two sides differ; None when one side's actions
    are the start of the other's."""
    return next((i for i, (a, b) in enumerate(zip(chosen, rejected), 1) if a != b), None)


def pairs_table(files: list[Path]) -> str:
    """One row per pairs file: what DPO is given to contrast. How many pairs part from the expert at each
    action number and the expert's most common actions there, the mean number of actions on each side, and
    the share of pairs whose failed side ends with the expert side's last action (on webshop, the purchase)
    or repeats its previous action."""
    lines = ["| file | pairs | the sides part at action (number: pairs) | the expert's action there (3 most common) "
             "| actions: chosen / rejected (mean) | rejected ends as chosen does % | rejected repeats an action % |",
             "|---|---:|---|---|---:|---:|---:|"]
    for path in files:
        sides = [(pair_actions(p.chosen), pair_actions(p.rejected)) for p in load_pairs(path, on_error="raise")]
        n = max(len(sides), 1)
        parts = [(parting_action(chosen, rejected), chosen) for chosen, rejected in sides]
        parted = Counter(at for at, _ in parts)  # None: never
        expert_there = Counter(chosen[at - 1] for at, chosen in parts if at is not None)
        common = sorted(expert_there.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        where = ", ".join(f"{k}: {parted[k]}" for k in sorted(k for k in parted if k is not None))
        where += f", never: {parted[None]}" if None in parted else ""
        mean_c, mean_r = (sum(len(s[i]) for s in sides) / n for i in (0, 1))
        same_end = sum(bool(c and r) and c[-1] == r[-1] for c, r in sides)
        repeats = sum(any(action_key(a) == action_key(b) for a, b in zip(r, r[1:])) for _, r in sides)
        lines.append(f"| {path} | {len(sides)} | {where} | {', '.join(f'{a}: {k}' for a, k in common)} "
                     f"| {mean_c:.1f} / {mean_r:.1f} "
                     f"| {100 * same_end / n:.1f} | {100 * repeats / n:.1f} |")
    return "\n".join(lines)
