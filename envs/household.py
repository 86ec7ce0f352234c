"""Household: a miniature ALFWorld (embodied tasks in one room, binary success).

A task is one room (kitchen, bathroom, living room or bedroom) with numbered
receptacles ("cabinet 2", "fridge 1"); cabinets, drawers, the fridge and the
microwave start closed, so the agent must search for objects. Goals, as in ALFWorld:

    place    put a mug in cabinet 2
    clean    put a clean mug in cabinet 2        (clean it with the sinkbasin)
    heat     put a hot apple on countertop 1     (heat it with the microwave)
    cool     put a cool apple on countertop 1    (cool it with the fridge)
    two      put two books on desk 1
    examine  look at the book under the desklamp (take it, find the lamp, use it)

Reward 1.0 once the goal holds, else 0.0. The expert searches the places an
object is usually found in a fixed order (e.g. a mug: cabinets, countertops,
shelves), so every step it takes can be predicted from what it has seen.

Splits. A task is a (goal, object) combination plus a random layout.
`UNSEEN` holds out 15 combinations: place mug/cellphone/soapbar, clean
potato/cloth/spoon, heat mug/bread, cool tomato/pan, two apple/keychain/candle,
examine book/alarmclock. `test_unseen` tasks use only them, while `train` and
`test_seen` never do. Every held-out object still occurs
in train with other goals, and every goal with other objects. `test_seen` tasks
are new layouts (other random seeds) of combinations seen in train.
"""

from __future__ import annotations

import re

from envs.base import TextEnv, a_or_an, join_list, task_rng

INSTRUCTION = """Interact with a household to solve a task. You are an agent in a room with numbered receptacles (cabinets, drawers, tables, appliances) and objects. At the start you are told what you see and what your task is. After each of your actions you get an observation. Think about the situation and plan your next steps, then act.

The available actions are:
1. go to {recep}
2. open {recep}
3. close {recep}
4. take {obj} from {recep}
5. put {obj} in/on {recep}
6. heat {obj} with {microwave}
7. cool {obj} with {fridge}
8. clean {obj} with {sinkbasin}
9. use {desklamp}
10. examine {obj or recep}
11. inventory
12. look
where {obj} and {recep} are objects and receptacles with their number, e.g. "mug 1" or "cabinet 2". You can carry one object at a time. Closed receptacles must be opened before you can see inside. If the observation is "Nothing happened.", the action was not valid; try something else.

Your response should use the following format:

Thought: <your thoughts>
Action: <your next action>"""

OPENABLE = {"cabinet", "drawer", "fridge", "microwave"}
APPLIANCE = {"heat": "microwave", "cool": "fridge", "clean": "sinkbasin"}
STATE_WORD = {"heat": "hot", "cool": "cool", "clean": "clean"}
GOALS = ("place", "clean", "heat", "cool", "two", "examine")

# room kind -> receptacle types with (min, max) count
ROOMS = {
    "kitchen": {"cabinet": (2, 4), "countertop": (1, 2), "drawer": (1, 2), "fridge": (1, 1), "microwave": (1, 1),
                "sinkbasin": (1, 1), "stoveburner": (1, 2), "diningtable": (1, 1), "shelf": (0, 1), "garbagecan": (1, 1)},
    "bathroom": {"cabinet": (1, 3), "countertop": (1, 1), "drawer": (1, 2), "sinkbasin": (1, 1),
                 "towelholder": (1, 1), "toilet": (1, 1), "shelf": (0, 1), "garbagecan": (1, 1)},
    "livingroom": {"sofa": (1, 1), "armchair": (0, 1), "coffeetable": (1, 1), "sidetable": (1, 2), "shelf": (1, 2),
                   "drawer": (1, 2), "cabinet": (0, 2), "garbagecan": (1, 1)},
    "bedroom": {"bed": (1, 1), "desk": (1, 1), "drawer": (1, 3), "shelf": (1, 2), "sidetable": (1, 2),
                "dresser": (1, 1), "garbagecan": (1, 1)},
}
# room kind -> receptacle types a goal may name as its target
TARGETS = {
    "kitchen": ["countertop", "diningtable", "cabinet", "shelf", "drawer", "fridge"],
    "bathroom": ["countertop", "cabinet", "shelf", "drawer", "toilet"],
    "livingroom": ["sofa", "coffeetable", "sidetable", "shelf", "drawer", "cabinet", "armchair"],
    "bedroom": ["bed", "desk", "sidetable", "shelf", "drawer", "dresser"],
}
# object -> (room kinds, where it is usually found in the order the expert searches, what can be done to it)
OBJECTS = {
    "apple": (["kitchen"], ["fridge", "countertop", "diningtable", "garbagecan"], {"clean", "heat", "cool"}),
    "potato": (["kitchen"], ["fridge", "countertop", "diningtable", "garbagecan"], {"clean", "heat", "cool"}),
    "tomato": (["kitchen"], ["fridge", "countertop", "diningtable"], {"clean", "heat", "cool"}),
    "egg": (["kitchen"], ["fridge", "countertop", "diningtable"], {"heat", "cool"}),
    "bread": (["kitchen"], ["countertop", "diningtable", "fridge"], {"heat", "cool"}),
    "lettuce": (["kitchen"], ["fridge", "countertop", "diningtable"], {"clean", "cool"}),
    "mug": (["kitchen"], ["cabinet", "countertop", "shelf"], {"clean", "heat", "cool"}),
    "cup": (["kitchen"], ["cabinet", "countertop", "diningtable"], {"clean", "heat", "cool"}),
    "plate": (["kitchen"], ["cabinet", "countertop", "diningtable"], {"clean", "heat", "cool"}),
    "bowl": (["kitchen"], ["cabinet", "shelf", "diningtable"], {"clean", "heat", "cool"}),
    "knife": (["kitchen"], ["drawer", "countertop", "diningtable"], {"clean"}),
    "spoon": (["kitchen"], ["drawer", "countertop", "diningtable"], {"clean"}),
    "pan": (["kitchen"], ["stoveburner", "cabinet", "countertop"], {"clean", "cool"}),
    "soapbar": (["bathroom"], ["countertop", "cabinet", "toilet"], {"clean"}),
    "cloth": (["bathroom"], ["cabinet", "drawer", "countertop"], {"clean"}),
    "towel": (["bathroom"], ["towelholder", "cabinet", "shelf"], set()),
    "candle": (["bathroom"], ["countertop", "shelf", "cabinet"], set()),
    "book": (["livingroom", "bedroom"], ["shelf", "sidetable", "desk", "coffeetable", "bed"], set()),
    "cellphone": (["livingroom", "bedroom"], ["sidetable", "drawer", "desk", "sofa", "bed"], set()),
    "keychain": (["livingroom", "bedroom"], ["drawer", "sidetable", "dresser", "coffeetable"], set()),
    "pen": (["livingroom", "bedroom"], ["desk", "drawer", "sidetable", "shelf"], set()),
    "creditcard": (["livingroom", "bedroom"], ["drawer", "desk", "sidetable", "dresser"], set()),
    "remotecontrol": (["livingroom"], ["coffeetable", "sofa", "sidetable", "armchair"], set()),
    "alarmclock": (["bedroom"], ["sidetable", "desk", "dresser", "shelf"], set()),
    "vase": (["livingroom", "bedroom"], ["shelf", "sidetable", "coffeetable", "dresser"], set()),
}
LAMP_PLACES = ["desk", "sidetable"]  # where the desklamp stands, in the order the expert looks

# The held-out (goal, object) combinations of test_unseen.
UNSEEN = frozenset({
    ("place", "mug"), ("place", "cellphone"), ("place", "soapbar"),
    ("clean", "potato"), ("clean", "cloth"), ("clean", "spoon"),
    ("heat", "mug"), ("heat", "bread"),
    ("cool", "tomato"), ("cool", "pan"),
    ("two", "apple"), ("two", "keychain"), ("two", "candle"),
    ("examine", "book"), ("examine", "alarmclock"),
})


def goal_rooms(goal: str, obj: str) -> list[str]:
    """The room kinds where `goal` can be done with `obj` (empty: not a valid combination)."""
    kinds, _, can = OBJECTS[obj]
    if goal in APPLIANCE:
        return [k for k in kinds if goal in can and APPLIANCE[goal] in ROOMS[k]]
    if goal == "examine":
        return [k for k in kinds if any(p in ROOMS[k] for p in LAMP_PLACES)]
    return list(kinds)


ALL_COMBOS = sorted((g, o) for g in GOALS for o in OBJECTS if goal_rooms(g, o))
SEEN_COMBOS = [c for c in ALL_COMBOS if c not in UNSEEN]
UNSEEN_COMBOS = [c for c in ALL_COMBOS if c in UNSEEN]


def prep(receptacle: str) -> str:
    """The preposition used with a receptacle in goals and messages."""
    return "in" if receptacle.split()[0] in {"cabinet", "drawer", "fridge", "microwave", "garbagecan"} else "on"


class HouseholdEnv(TextEnv):
    name = "household"
    instruction = INSTRUCTION
    max_steps = 30
    unmatched_action = "Nothing happened."
    invalid_format = "Observation: Error Input. Your input must contains 'Action: '"  # as the official ALFWorld env
    truncate_rejected = False  # binary reward: the official pair rule keeps the whole failed run

    # ---- task generation --------------------------------------------------------
    def make_task(self, split: str, index: int) -> dict:
        """Room layout, object placement and goal of one task (a pure function of seed, split, index)."""
        rng = task_rng(self.seed, self.name, split, index)
        goal, obj = rng.choice(UNSEEN_COMBOS if split == "test_unseen" else SEEN_COMBOS)
        kind = rng.choice(goal_rooms(goal, obj))
        types = [t for t, (lo, hi) in ROOMS[kind].items() for _ in range(rng.randint(lo, hi))]
        counts: dict[str, int] = {}
        receptacles = []
        for t in types:
            counts[t] = counts.get(t, 0) + 1
            receptacles.append(f"{t} {counts[t]}")
        rng.shuffle(receptacles)  # the order they are listed in the room description
        contents = {r: [] for r in receptacles}
        candidates = [t for t in TARGETS[kind] if t in counts and not (goal == "cool" and t == "fridge")]
        target = rng.choice([r for r in receptacles if r.split()[0] in candidates])
        places = search_order(obj, receptacles, exclude=target)
        for i in range(2 if goal == "two" else 1):
            contents[rng.choice(places)].append(f"{obj} {i + 1}")
        if goal == "examine":
            lamp_places = [r for r in receptacles if r.split()[0] in LAMP_PLACES]
            contents[rng.choice(lamp_places)].append("desklamp 1")
        others = [o for o, (kinds, _, _) in OBJECTS.items() if kind in kinds and o != obj]
        for other in rng.sample(others, min(len(others), rng.randint(2, 5))):
            spots = [r for r in receptacles if r.split()[0] in OBJECTS[other][1]] or receptacles
            contents[rng.choice(spots)].append(f"{other} 1")
        return {"kind": kind, "goal": goal, "object": obj, "target": target,
                "receptacles": receptacles, "contents": contents}

    def start(self, task: dict) -> str:
        self.contents = {r: list(objs) for r, objs in task["contents"].items()}
        self.closed = {r for r in task["receptacles"] if r.split()[0] in OPENABLE}
        self.states: dict[str, set] = {}  # object -> {"hot", "cool", "clean"}
        self.location = None  # None: the middle of the room
        self.holding = None
        self.success = False
        return f"{self.room_description()}\n\nYour task is to: {goal_text(task)}."

    def room_description(self) -> str:
        seen = join_list([a_or_an(r) for r in self.task["receptacles"]])
        return f"You are in the middle of a room. Looking quickly around you, you see {seen}."

    # ---- world --------------------------------------------------------------------
    def describe(self, rec: str) -> str:
        if rec in self.closed:
            return f"The {rec} is closed."
        return f"{prep(rec).capitalize()} the {rec}, you see {join_list([a_or_an(o) for o in self.contents[rec]])}."

    def goal_met(self) -> bool:
        goal, obj, target = self.task["goal"], self.task["object"], self.task["target"]
        if goal == "examine":
            return self.success
        state = STATE_WORD.get(goal)
        good = [o for o in self.contents[target] if o.rsplit(" ", 1)[0] == obj
                and (state is None or state in self.states.get(o, set()))]
        return len(good) >= (2 if goal == "two" else 1)

    def current_reward(self) -> float:
        return 1.0 if self.success else 0.0

    def act(self, action: str) -> tuple[str, bool, dict]:
        observation = self.execute(action.lower())
        valid = observation is not None
        if not self.success and self.goal_met():
            self.success = True
        return (observation if valid else "Nothing happened."), self.success, {"valid": valid}

    def execute(self, action: str) -> str | None:
        """Carry out a lowercased action; None when it is not valid here."""
        here, hand = self.location, self.holding
        if action == "look":
            return self.room_description() if here is None else f"You are at the {here}. {self.describe(here)}"
        if action == "inventory":
            return f"You are carrying: {a_or_an(hand)}." if hand else "You are not carrying anything."
        if m := re.fullmatch(r"go to (.+)", action):
            rec = m[1]
            if rec not in self.contents or rec == here:
                return None
            self.location = rec
            return f"You arrive at {rec}. {self.describe(rec)}"
        if m := re.fullmatch(r"(open|close) (.+)", action):
            verb, rec = m[1], m[2]
            if rec != here or rec.split()[0] not in OPENABLE or (rec in self.closed) != (verb == "open"):
                return None
            if verb == "close":
                self.closed.add(rec)
                return f"You close the {rec}."
            self.closed.discard(rec)
            return f"You open the {rec}. {self.describe(rec)}"
        if m := re.fullmatch(r"take (.+) from (.+)", action):
            obj, rec = m[1], m[2]
            if rec != here or rec in self.closed or hand or obj not in self.contents[rec] or obj == "desklamp 1":
                return None
            self.contents[rec].remove(obj)
            self.holding = obj
            return f"You pick up the {obj} from the {rec}."
        if m := re.fullmatch(r"put (.+) (?:in/on|in|on) (.+)", action):
            obj, rec = m[1], m[2]
            if rec != here or rec in self.closed or hand != obj:
                return None
            self.contents[rec].append(obj)
            self.holding = None
            return f"You put the {obj} {prep(rec)} the {rec}."
        if m := re.fullmatch(r"(heat|cool|clean) (.+) with (.+)", action):
            verb, obj, rec = m[1], m[2], m[3]
            if rec != here or hand != obj or rec.split()[0] != APPLIANCE[verb]:
                return None
            if verb not in OBJECTS[obj.rsplit(" ", 1)[0]][2]:
                return None
            states = self.states.setdefault(obj, set())
            states.discard({"heat": "cool", "cool": "hot"}.get(verb))
            states.add(STATE_WORD[verb])
            return f"You {verb} the {obj} using the {rec}."
        if m := re.fullmatch(r"use (.+)", action):
            if m[1] != "desklamp 1" or here is None or "desklamp 1" not in self.contents[here]:
                return None
            self.success = hand is not None and hand.rsplit(" ", 1)[0] == self.task["object"] \
                and self.task["goal"] == "examine"
            return "You turn on the desklamp 1."
        if m := re.fullmatch(r"examine (.+)", action):
            if m[1] == hand:
                states = sorted(self.states.get(hand, set()))
                return f"This is {a_or_an(' '.join(states + [hand]))}."
            return self.describe(here) if m[1] == here else None
        return None

    # ---- expert ---------------------------------------------------------------------
    def expert_steps(self):
        goal, obj, target = self.task["goal"], self.task["object"], self.task["target"]
        order = search_order(obj, self.task["receptacles"], exclude=target)
        seen: dict[str, list[str]] = {}  # receptacle -> objects seen there
        if goal == "two":
            plan = f"find and take the first {obj}, put it {prep(target)} {target}, then do the same with a second {obj}"
        elif goal == "examine":
            plan = f"find and take {a_or_an(obj)}, then find the desklamp and use it"
        elif goal in APPLIANCE:
            plan = (f"find and take {a_or_an(obj)}, then {goal} it with {APPLIANCE[goal]} 1, "
                    f"then put it {prep(target)} {target}")
        else:
            plan = f"find and take {a_or_an(obj)}, then put it {prep(target)} {target}"
        intro = (f"To solve the task, I need to {plan}. {a_or_an(obj).capitalize()} is likely in "
                 f"{join_list(order)}. I will check {order[0]} first.")
        for round_ in range(2 if goal == "two" else 1):
            item = yield from self.find_and_take(obj, order, seen, intro)
            intro = None
            if goal in APPLIANCE:
                appliance = f"{APPLIANCE[goal]} 1"
                yield from self.visit(appliance, f"Now I have the {item}. Next, I will go to {appliance} to {goal} it.",
                                      seen, need_open=False)
                yield f"I am at {appliance}. I will {goal} the {item} with it.", f"{goal} {item} with {appliance}"
                then = f"The {item} is {STATE_WORD[goal]} now. Next, I will put it {prep(target)} {target}."
            elif goal == "examine":
                yield from self.find_lamp(item, seen)
                return
            else:
                then = f"Now I have the {item}. Next, I will put it {prep(target)} {target}."
            yield from self.visit(target, then, seen)
            yield f"I will put the {item} {prep(target)} the {target}.", f"put {item} in/on {target}"
            if round_ == 0 and goal == "two":
                where = next((r for r in order if any(o.startswith(obj + " ") for o in seen.get(r, []))), None)
                if where:
                    intro = f"The first {obj} is {prep(target)} {target}. I saw another {obj} at {where}, so I go back there."
                else:
                    nxt = next(r for r in order if r not in seen)
                    intro = f"The first {obj} is {prep(target)} {target}. Now I need a second {obj}. I will check {nxt}."

    def visit(self, rec: str, thought: str, seen: dict, need_open: bool = True):
        """Go to a receptacle (if not there) and open it (if closed and `need_open`)."""
        if self.location != rec:
            yield thought, f"go to {rec}"
        if need_open and rec in self.closed:
            yield f"The {rec} is closed. I will open it.", f"open {rec}"
        if rec not in self.closed:
            seen[rec] = list(self.contents[rec])

    def find_and_take(self, obj: str, order: list[str], seen: dict, intro: str | None):
        """Search `order` (remembering what was seen) until an `obj` turns up; take it; return its name."""
        thought = intro
        for rec in order:
            if rec in seen and not any(o.startswith(obj + " ") for o in seen[rec]):
                continue  # already searched, nothing there
            yield from self.visit(rec, thought or f"Next, I will check {rec}.", seen)
            found = [o for o in self.contents[rec] if o.rsplit(" ", 1)[0] == obj]
            if found:
                yield f"I found the {found[0]} {prep(rec)} the {rec}. I will take it.", f"take {found[0]} from {rec}"
                seen[rec].remove(found[0])
                return found[0]
            nxt = next((r for r in order[order.index(rec) + 1:] if r not in seen), None)
            thought = f"There is no {obj} {prep(rec)} the {rec}. Next, I will check {nxt}."
        raise AssertionError("the expert searched everywhere")  # make_task always places the object

    def find_lamp(self, item: str, seen: dict):
        lamp_at = next((r for r, objs in seen.items() if "desklamp 1" in objs), None)
        places = [r for r in self.task["receptacles"] if r.split()[0] in LAMP_PLACES]
        places.sort(key=lambda r: (LAMP_PLACES.index(r.split()[0]), r))
        if lamp_at:
            todo, thought = [lamp_at], f"Now I have the {item}. I saw the desklamp 1 at {lamp_at}, so I go there."
        else:
            todo = [r for r in places if r not in seen]
            thought = f"Now I have the {item}. Next, I need the desklamp. It is likely on {join_list(todo)}."
        for rec in todo:
            yield from self.visit(rec, thought, seen)
            if "desklamp 1" in self.contents[rec]:
                yield f"The desklamp 1 is here. I will turn it on to look at the {item}.", "use desklamp 1"
                return
            thought = f"There is no desklamp {prep(rec)} the {rec}. Next, I will check another place."
        raise AssertionError("the expert did not find the desklamp")

    # ---- random baseline ----------------------------------------------------------
    def admissible_actions(self) -> list[str]:
        here, hand = self.location, self.holding
        actions = ["look", "inventory"] + [f"go to {r}" for r in self.task["receptacles"] if r != here]
        if here is not None:
            actions.append(f"examine {here}")
            if here.split()[0] in OPENABLE:
                actions.append(f"close {here}" if here not in self.closed else f"open {here}")
            if here not in self.closed:
                if hand is None:
                    actions += [f"take {o} from {here}" for o in self.contents[here] if o != "desklamp 1"]
                else:
                    actions.append(f"put {hand} in/on {here}")
            if hand is not None:
                verb = {v: k for k, v in APPLIANCE.items()}.get(here.split()[0])
                if verb:
                    actions.append(f"{verb} {hand} with {here}")
            if "desklamp 1" in self.contents[here]:
                actions.append("use desklamp 1")
        return actions


def search_order(obj: str, receptacles: list[str], exclude: str) -> list[str]:
    """The receptacles where `obj` may be, in the order the expert searches them."""
    types = OBJECTS[obj][1]
    order = [r for r in receptacles if r.split()[0] in types and r != exclude]
    return sorted(order, key=lambda r: (types.index(r.split()[0]), int(r.split()[1])))


def plural(noun: str) -> str:
    return {"knife": "knives", "potato": "potatoes", "tomato": "tomatoes", "lettuce": "lettuces"}.get(noun, noun + "s")


def goal_text(task: dict) -> str:
    goal, obj, target = task["goal"], task["object"], task["target"]
    if goal == "examine":
        return f"look at the {obj} under the desklamp"
    if goal == "two":
        return f"put two {plural(obj)} {prep(target)} {target}"
    state = STATE_WORD.get(goal)
    return f"put {a_or_an(f'{state} {obj}' if state else obj)} {prep(target)} {target}"
