"""Science procedures: a miniature ScienceWorld (multi-step procedures, partial progress score).

The world is a house of rooms (kitchen, foundry, workshop, greenhouse, art studio,
outside, ...); the agent can teleport to any room. Procedures, with their items:

    boil / melt / freeze  a substance   heat it on the stove (blast furnace for metals) or cool it in the freezer
    conductivity          an object     build battery -> object -> light bulb, look at the bulb, put the
                                        object in the box for conductive or for non-conductive things
    grow                  a seed        plant it in an empty flower pot, water it, wait until it is adult
    find                  a plant/animal  look for it in two rooms, pick it up, put it in a named box
    mix                   a paint color mix the two primary paints in a container, focus on the result

Each procedure has subgoals (e.g. boil: focused on the substance, it is on a heater
that can heat it, the heater is on, it is a gas). `info["score"]` is the fraction of
subgoals that hold now (1.0 and done when the last one holds); `reward` is the max
score seen, as in the official ETO code. Focusing on a wrong object, or putting the
object in the wrong box, fails the task (done, reward = max score seen so far).

Splits. A task is a (procedure, item) combination plus a random layout (where
things stand, containers, distractors, box colors). `UNSEEN` holds out 8
combinations: boil milk, boil tin, freeze orange juice, melt butter, conductivity
of lead, grow peach, find bean (the bean plant), mix violet. `test_unseen` uses
only them, `train` and `test_seen` never do. Every
held-out item occurs in train with another procedure (violet paint: its primaries
red and blue occur in train in other mixtures). `test_seen` tasks are new layouts
(other random seeds) of combinations seen in train.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from envs.base import TextEnv, a_or_an, join_list, task_rng

INSTRUCTION = """You are a helpful assistant doing a science experiment in an environment.
The environment has several rooms: hallway, kitchen, foundry, workshop, greenhouse, art studio, outside, bathroom, bedroom.
You can teleport to any room in one step. All containers are open: you can take things out of them directly.
Find the things you need and carry out the experiment.

The available actions are:
look around: describe the current room
teleport to LOC: go to a room
look at OBJ: describe an object in detail
pick up OBJ: move an object to your inventory
move OBJ to OBJ: move an object into a container or onto a device
activate OBJ / deactivate OBJ: turn a device on or off
connect OBJ to OBJ: connect two things electrically
use OBJ on OBJ: use a tool on something
mix OBJ: mix the contents of a container
focus on OBJ: signal that an object is the object of the task (focusing on a wrong object fails the task)
inventory: list what you carry
wait: let time pass

Your response should use the following format:

Thought: <your thoughts>
Action: <your next action>"""

ROOMS = ["hallway", "kitchen", "foundry", "workshop", "greenhouse", "art studio", "outside", "bathroom", "bedroom"]
STATES = ["solid", "liquid", "gas"]
# substance -> (state at the start, heat level needed to change it: 1 stove, 2 blast furnace)
SUBSTANCES = {"water": ("liquid", 1), "milk": ("liquid", 1), "orange juice": ("liquid", 1), "apple juice": ("liquid", 1),
              "chocolate": ("solid", 1), "butter": ("solid", 1), "wax": ("solid", 1), "lead": ("solid", 2),
              "tin": ("solid", 2)}
HEATERS = {"stove": 1, "blast furnace": 2}
CONDUCTIVE = {"metal fork": True, "steel spoon": True, "iron nail": True, "aluminum foil": True, "lead": True,
              "tin": True, "wooden spoon": False, "plastic cup": False, "rubber ball": False, "glass marble": False,
              "wax": False}
SPECIES = ["apple", "orange", "peach", "pea", "bean", "sunflower", "tomato"]
ANIMALS = ["frog", "bee", "butterfly", "turtle", "rabbit", "snail", "beetle"]
MIXES = {"green": ("blue", "yellow"), "orange": ("red", "yellow"), "violet": ("red", "blue")}
PROCEDURES = {
    "boil": sorted(SUBSTANCES),
    "melt": sorted(s for s, (state, _) in SUBSTANCES.items() if state == "solid"),
    "freeze": sorted(s for s, (state, _) in SUBSTANCES.items() if state == "liquid"),
    "conductivity": sorted(CONDUCTIVE),
    "grow": SPECIES,
    "find": SPECIES + ANIMALS,
    "mix": sorted(MIXES),
}
UNSEEN = frozenset({("boil", "milk"), ("boil", "tin"), ("freeze", "orange juice"), ("melt", "butter"),
                    ("conductivity", "lead"), ("grow", "peach"), ("find", "bean"), ("mix", "violet")})
CONTAINERS = ["metal pot", "glass cup", "ceramic bowl", "steel bucket", "flask"]
BOX_COLORS = ["red", "green", "blue", "orange", "yellow", "purple"]
DISTRACTORS = ["chair", "picture", "notebook", "clock", "rug", "cushion", "lamp", "bookshelf"]


@dataclass
class Thing:
    place: str  # a room, another thing's name, or "inventory"
    portable: bool = True
    holds: bool = False  # other things can be put in it
    state: str = ""  # substance: solid/liquid/gas; heater: on/off; seed: seed/seedling/adult; pot: dry/watered


def combos(split: str) -> list[tuple[str, str]]:
    """The (procedure, item) combinations a split draws from."""
    return [(p, i) for p, items in PROCEDURES.items() for i in items if ((p, i) in UNSEEN) == (split == "test_unseen")]


# ---- task setups: place the procedure's things in the world; return the task's fields ----
def setup_state_change(rng, things: dict, item: str) -> dict:
    """A substance in a random container: in the kitchen (foundry for metals)."""
    container = rng.choice(CONTAINERS)
    room = "kitchen" if SUBSTANCES[item][1] == 1 else "foundry"
    things[container] = Thing(rng.choice(["counter", "kitchen"]) if room == "kitchen" else room, holds=True)
    things[item] = Thing(container, portable=False, state=SUBSTANCES[item][0])
    return {"focus": item, "room": room, "container": container}


def setup_conductivity(rng, things: dict, item: str) -> dict:
    """The object in a named room; two boxes of random colors in the workshop."""
    room = rng.choice(["kitchen", "workshop", "bedroom", "art studio", "bathroom"])
    yes, no = (f"{c} box" for c in rng.sample(BOX_COLORS, 2))
    things[item] = Thing(room)
    things[yes] = Thing("workshop", False, True)
    things[no] = Thing("workshop", False, True)
    return {"focus": item, "room": room, "yes": yes, "no": no}


def setup_grow(rng, things: dict, item: str) -> dict:
    """A seed jar with three seeds; three flower pots, at least one of them empty."""
    things["seed jar"] = Thing("greenhouse", False, True)
    for species in [item] + rng.sample([s for s in SPECIES if s != item], 2):
        things[f"{species} seed"] = Thing("seed jar", state="seed")
    things["watering can"] = Thing("greenhouse", False)
    plants = [None] + rng.sample([None] + [s for s in SPECIES if s != item], 2)
    rng.shuffle(plants)
    empty = []
    for i, species in enumerate(plants, start=1):
        things[f"flower pot {i}"] = Thing("greenhouse", False, True, "dry")
        if species:
            things[f"{species} plant"] = Thing(f"flower pot {i}", False)
        else:
            empty.append(f"flower pot {i}")
    return {"focus": f"{item} seed", "pots": empty}


def setup_find(rng, things: dict, item: str) -> dict:
    """The plant or animal in one of two named rooms; a box of a random color in a third."""
    name = f"{item} plant" if item in SPECIES else item
    rooms = rng.sample(["greenhouse", "outside", "bedroom", "bathroom"], 2)
    box_room = rng.choice(["kitchen", "workshop", "hallway"])
    box = f"{rng.choice(BOX_COLORS)} box"
    things[name] = Thing(rng.choice(rooms))
    things[box] = Thing(box_room, False, True)
    return {"focus": name, "rooms": rooms, "box": box, "box_room": box_room}


def setup_mix(rng, things: dict, item: str) -> dict:
    """The three primary paints and an empty container in the art studio."""
    container = rng.choice(["jar", "bowl", "cup"])
    things[container] = Thing(rng.choice(["art studio", "easel"]), holds=True)
    for color in rng.sample(["red", "blue", "yellow"], 3):
        things[f"{color} paint"] = Thing(rng.choice(["art studio", "easel"]))
    return {"focus": f"{item} paint", "container": container}


SETUPS = {"boil": setup_state_change, "melt": setup_state_change, "freeze": setup_state_change,
          "conductivity": setup_conductivity, "grow": setup_grow, "find": setup_find, "mix": setup_mix}


class ScienceEnv(TextEnv):
    name = "science"
    instruction = INSTRUCTION
    max_steps = 20
    unmatched_action = "No known action matches"

    # ---- task generation --------------------------------------------------------
    def make_task(self, split: str, index: int) -> dict:
        """The world and goal of one task (a pure function of seed, split, index)."""
        rng = task_rng(self.seed, self.name, split, index)
        allowed = combos(split)
        proc = rng.choice(sorted({p for p, _ in allowed}))  # procedures equally often
        item = rng.choice([i for p, i in allowed if p == proc])
        things = {"counter": Thing("kitchen", False, True), "freezer": Thing("kitchen", False, True),
                  "stove": Thing("kitchen", False, True, "off"), "blast furnace": Thing("foundry", False, True, "off"),
                  "table": Thing("workshop", False, True), "battery": Thing("workshop", False),
                  "light bulb": Thing("workshop", False), "easel": Thing("art studio", False, True)}
        for room in ROOMS:
            for d in rng.sample(DISTRACTORS, rng.randint(0, 2)):
                if d not in things:
                    things[d] = Thing(room, False)
        task = {"procedure": proc, "item": item, "things": things}
        task.update(SETUPS[proc](rng, things, item))
        return task

    def start(self, task: dict) -> str:
        self.things = {n: Thing(**vars(t)) for n, t in task["things"].items()}
        self.location = "hallway"
        self.focused = False
        self.failed = False
        self.connections: set[frozenset] = set()
        self.moved: set[str] = set()  # things the agent has picked up or moved
        self.score = 0.0
        self.best = 0.0
        return task_text(task)

    # ---- world --------------------------------------------------------------------
    def room_of(self, name: str) -> str:
        """The room a thing is in ("inventory" for carried things)."""
        while name in self.things:
            name = self.things[name].place
        return name

    def place_of(self, name: str) -> str:
        """The room a thing is in, counting carried things as in the agent's room."""
        room = self.room_of(name)
        return self.location if room == "inventory" else room

    def reachable(self, name: str) -> bool:
        return name in self.things and self.room_of(name) in (self.location, "inventory")

    def inside(self, name: str) -> list[str]:
        return [n for n, t in self.things.items() if t.place == name]

    def describe(self, name: str) -> str:
        t = self.things[name]
        if name in SUBSTANCES:
            return f"{t.state} {name}" if t.state != "gas" else f"{name} vapor"
        text = a_or_an(name) + (f" ({t.state})" if t.state in ("on", "off", "seedling", "adult", "watered") else "")
        contents = self.inside(name)
        if contents:
            text += " (with " + join_list([self.describe(c) for c in contents]) + ")"
        return text

    def look_around(self) -> str:
        here = [self.describe(n) for n in self.inside(self.location)]
        return f"This room is called the {self.location}. In it, you see: {join_list(['yourself'] + here)}."

    def heater_of(self, name: str) -> str | None:
        """The heater a substance sits on (through its container), if any."""
        place = self.things[name].place
        while place in self.things:
            if place in HEATERS:
                return place
            place = self.things[place].place
        return None

    def in_freezer(self, name: str) -> bool:
        return self.things[name].place == "freezer" or self.things.get(self.things[name].place, Thing("")).place == "freezer"

    def circuit(self, name: str) -> bool:
        return {frozenset(("battery", name)), frozenset((name, "light bulb"))} <= self.connections

    def bulb_on(self) -> bool:
        return any(self.circuit(n) and CONDUCTIVE.get(n, False) for n in self.things)

    def wait(self) -> str:
        """Time passes: heaters heat, the freezer cools, watered seeds grow."""
        changes = []
        for name, t in self.things.items():
            if name in SUBSTANCES:
                heater = self.heater_of(name)
                if heater and self.things[heater].state == "on" and HEATERS[heater] >= SUBSTANCES[name][1] \
                        and t.state != "gas":
                    t.state = STATES[STATES.index(t.state) + 1]
                    changes.append(f"the {name} {'melts' if t.state == 'liquid' else 'boils'}")
                elif self.in_freezer(name) and t.state != "solid":
                    t.state = STATES[STATES.index(t.state) - 1]
                    changes.append(f"the {name} {'freezes' if t.state == 'solid' else 'condenses'}")
            elif name.endswith(" seed") and self.things.get(t.place, Thing("")).state == "watered" \
                    and t.state != "adult":
                t.state = "seedling" if t.state == "seed" else "adult"
                changes.append(f"the {name} grows into {'a seedling' if t.state == 'seedling' else 'an adult plant'}")
        return "You wait. " + (join_list(changes).capitalize() + "." if changes else "Nothing seems to change.")

    # ---- score --------------------------------------------------------------------
    def subgoals(self) -> list[bool]:
        """Which subgoals of the task hold now; the last one completes the task."""
        task, th = self.task, self.things
        proc, focus = task["procedure"], task["focus"]
        if proc in ("boil", "melt"):
            heater = self.heater_of(focus)
            hot = heater is not None and HEATERS[heater] >= SUBSTANCES[focus][1]
            goal = [hot, hot and th[heater].state == "on"]
            if proc == "boil" and SUBSTANCES[focus][0] == "solid":
                goal.append(th[focus].state in ("liquid", "gas"))
            return [self.focused] + goal + [th[focus].state == ("gas" if proc == "boil" else "liquid")]
        if proc == "freeze":
            return [self.focused, self.in_freezer(focus), th[focus].state == "solid"]
        carried = focus in self.moved
        if proc == "conductivity":
            box = task["yes"] if CONDUCTIVE[focus] else task["no"]
            return [self.focused, carried, carried and self.place_of(focus) == "workshop",
                    self.circuit(focus) or th[focus].place == box, th[focus].place == box]
        if proc == "grow":
            pot = th[focus].place
            return [self.focused, pot in task["pots"], th.get(pot, Thing("")).state == "watered",
                    th[focus].state in ("seedling", "adult"), th[focus].state == "adult"]
        if proc == "find":
            return [self.focused, carried, carried and self.place_of(focus) == task["box_room"],
                    th[focus].place == task["box"]]
        a, b = (f"{c} paint" for c in MIXES[task["item"]])
        made = focus in th
        in_container = [made or (p in th and th[p].place == task["container"]) for p in (a, b)]
        return in_container + [made, self.focused]

    def current_reward(self) -> float:
        return self.best

    def act(self, action: str) -> tuple[str, bool, dict]:
        observation = self.execute(action.lower())
        valid = observation is not None
        if not valid:
            observation = "No known action matches that input, or the object is not here."
        goals = self.subgoals()
        complete = goals[-1] and not self.failed
        self.score = 1.0 if complete else sum(goals) / len(goals)
        self.best = max(self.best, self.score)
        return observation, complete or self.failed, {"valid": valid, "score": self.score,
                                                      **({"reason": "failed"} if self.failed else {})}

    def execute(self, action: str) -> str | None:
        """Carry out a lowercased action; None when it is not valid here."""
        th = self.things
        if action == "look around":
            return self.look_around()
        if action == "inventory":
            return "In your inventory, you see: " + join_list([self.describe(n) for n in self.inside("inventory")]) + "."
        if action in ("wait", "wait1"):
            return self.wait()
        if m := re.fullmatch(r"teleport to (.+)", action):
            if m[1] not in ROOMS:
                return None
            self.location = m[1]
            return f"You teleport to the {m[1]}."
        if m := re.fullmatch(r"(?:look at|examine) (.+)", action):
            if m[1] == "light bulb" and self.reachable(m[1]):
                return f"The light bulb is {'on' if self.bulb_on() else 'off'}."
            return f"You see {self.describe(m[1])}." if self.reachable(m[1]) else None
        if m := re.fullmatch(r"focus on (.+)", action):
            if not self.reachable(m[1]):
                return None
            if m[1] != self.task["focus"]:
                self.failed = True
                return f"You focus on the {m[1]}. That is not the object of the task: the task has failed."
            self.focused = True
            return f"You focus on the {m[1]}."
        if m := re.fullmatch(r"pick up (.+)", action):
            if not self.reachable(m[1]) or not th[m[1]].portable or th[m[1]].place == "inventory":
                return None
            th[m[1]].place = "inventory"
            self.moved.add(m[1])
            return f"You move the {m[1]} to the inventory."
        if m := re.fullmatch(r"move (.+) to (.+)", action):
            obj, dest = m[1], m[2]
            if not (self.reachable(obj) and self.reachable(dest)) or not th[obj].portable or not th[dest].holds:
                return None
            if obj == dest or th[obj].place == dest or self.room_of(dest) == obj:
                return None
            th[obj].place = dest
            self.moved.add(obj)
            if self.task["procedure"] == "conductivity" and obj == self.task["focus"] and dest.endswith(" box"):
                right = self.task["yes"] if CONDUCTIVE[obj] else self.task["no"]
                if dest != right:
                    self.failed = True
                    return f"You move the {obj} to the {dest}. That is the wrong box: the task has failed."
            return f"You move the {obj} to the {dest}."
        if m := re.fullmatch(r"(activate|deactivate) (.+)", action):
            if m[2] not in HEATERS or not self.reachable(m[2]):
                return None
            th[m[2]].state = "on" if m[1] == "activate" else "off"
            return f"The {m[2]} is now {th[m[2]].state}."
        if m := re.fullmatch(r"connect (.+) to (.+)", action):
            if m[1] == m[2] or not (self.reachable(m[1]) and self.reachable(m[2])):
                return None
            self.connections.add(frozenset((m[1], m[2])))
            return f"The {m[1]} is now connected to the {m[2]}."
        if m := re.fullmatch(r"use (.+) on (.+)", action):
            if m[1] != "watering can" or not m[2].startswith("flower pot") or not (
                    self.reachable(m[1]) and self.reachable(m[2])):
                return None
            th[m[2]].state = "watered"
            return f"You water the {m[2]}."
        if m := re.fullmatch(r"mix (.+)", action):
            if not self.reachable(m[1]) or not th[m[1]].holds:
                return None
            colors = sorted(n.split()[0] for n in self.inside(m[1]) if n.endswith(" paint"))
            made = next((c for c, parts in MIXES.items() if sorted(parts) == colors), None)
            if made is None:
                return f"Mixing the {m[1]} does not make anything new."
            for c in colors:
                del th[f"{c} paint"]
            th[f"{made} paint"] = Thing(m[1])
            return f"The {join_list([c + ' paint' for c in colors])} mix into {made} paint."
        return None

    # ---- expert ---------------------------------------------------------------------
    def expert_steps(self):
        experts = {"boil": self.expert_state_change, "melt": self.expert_state_change,
                   "freeze": self.expert_state_change, "conductivity": self.expert_conductivity,
                   "grow": self.expert_grow, "find": self.expert_find, "mix": self.expert_mix}
        yield from experts[self.task["procedure"]](self.task)

    def expert_state_change(self, task: dict):
        verb, item, container, room = task["procedure"], task["item"], task["container"], task["room"]
        yield f"To {verb} the {item}, I first need to find it. It should be in the {room}.", f"teleport to {room}"
        yield f"I am in the {room}. I will look around for the {item}.", "look around"
        yield f"The {item} is in the {container}. First, I focus on the {item}.", f"focus on {item}"
        if verb == "freeze":
            yield f"To freeze the {item}, I will put the {container} in the freezer.", f"move {container} to freezer"
            yield f"The {container} is in the freezer. I will wait for the {item} to freeze.", "wait"
            return
        heater = "stove" if room == "kitchen" else "blast furnace"
        yield f"To {verb} the {item}, I need to heat it. I will move the {container} to the {heater}.", \
            f"move {container} to {heater}"
        yield f"Now I activate the {heater} to heat the {container}.", f"activate {heater}"
        yield f"The {heater} is on. I will wait for the {item} to {verb}.", "wait"
        if verb == "boil" and self.things[item].state != "gas":
            yield f"The {item} has melted but is not boiling yet. I will wait longer.", "wait"

    def expert_conductivity(self, task: dict):
        item, room, yes, no = task["item"], task["room"], task["yes"], task["no"]
        if room != self.location:
            yield f"The {item} is in the {room}. I will teleport there.", f"teleport to {room}"
        yield f"First, I focus on the {item}.", f"focus on {item}"
        yield f"I need to test the {item} in a circuit, so I pick it up.", f"pick up {item}"
        if self.location != "workshop":
            yield "The battery and the light bulb are in the workshop. I will teleport there.", "teleport to workshop"
        yield f"I will connect the battery to the {item}.", f"connect battery to {item}"
        yield f"Now I connect the {item} to the light bulb to close the circuit.", f"connect {item} to light bulb"
        yield f"I will look at the light bulb to see if the {item} conducts electricity.", "look at light bulb"
        if self.bulb_on():
            yield f"The light bulb is on, so the {item} is conductive. I will put it in the {yes}.", f"move {item} to {yes}"
        else:
            yield f"The light bulb is off, so the {item} is not conductive. I will put it in the {no}.", \
                f"move {item} to {no}"

    def expert_grow(self, task: dict):
        seed, pot = task["focus"], task["pots"][0]
        yield "Seeds and flower pots are in the greenhouse. I will teleport there.", "teleport to greenhouse"
        yield "I will look around to find the seed and an empty flower pot.", "look around"
        yield f"The {seed} is in the seed jar. First, I focus on it.", f"focus on {seed}"
        yield f"The {pot} has no plant in it, so I plant the {seed} there.", f"move {seed} to {pot}"
        yield f"The seed needs water. I will water the {pot} with the watering can.", f"use watering can on {pot}"
        yield f"Now I wait for the {seed} to grow.", "wait"
        yield f"The {seed} is a seedling now. I will wait until it is an adult plant.", "wait"

    def expert_find(self, task: dict):
        name, (first, second), box, box_room = task["focus"], task["rooms"], task["box"], task["box_room"]
        yield f"The {name} is in the {first} or the {second}. I will check the {first} first.", f"teleport to {first}"
        yield f"I will look around for the {name}.", "look around"
        if self.room_of(name) != first:
            yield f"There is no {name} in the {first}. It must be in the {second}.", f"teleport to {second}"
            yield f"I will look around for the {name}.", "look around"
        yield f"I found the {name}. First, I focus on it.", f"focus on {name}"
        yield f"Now I pick up the {name}.", f"pick up {name}"
        yield f"The {box} is in the {box_room}. I will teleport there.", f"teleport to {box_room}"
        yield f"I will move the {name} to the {box}.", f"move {name} to {box}"

    def expert_mix(self, task: dict):
        a, b = (f"{c} paint" for c in MIXES[task["item"]])
        target, container = task["focus"], task["container"]
        yield "Paints are in the art studio. I will teleport there.", "teleport to art studio"
        yield "I will look around for paints and an empty container.", "look around"
        yield f"{target.capitalize()} is made from {a} and {b}. I will move the {a} to the {container}.", \
            f"move {a} to {container}"
        yield f"Next, I move the {b} to the {container}.", f"move {b} to {container}"
        yield f"Both paints are in the {container}. I will mix them.", f"mix {container}"
        yield f"The {target} is made. I focus on it to finish the task.", f"focus on {target}"

    # ---- random baseline ----------------------------------------------------------
    def admissible_actions(self) -> list[str]:
        near = [n for n in self.things if self.reachable(n)]
        actions = ["look around", "inventory", "wait"] + [f"teleport to {r}" for r in ROOMS if r != self.location]
        for n in near:
            t = self.things[n]
            actions += [f"look at {n}", f"focus on {n}"]
            if t.portable:
                actions.append(f"pick up {n}")
                actions += [f"move {n} to {d}" for d in near if self.things[d].holds and d != n]
            if n in HEATERS:
                actions.append(f"{'deactivate' if t.state == 'on' else 'activate'} {n}")
            if t.holds:
                actions.append(f"mix {n}")
            if n.startswith("flower pot") and "watering can" in near:
                actions.append(f"use watering can on {n}")
        if "battery" in near:
            actions += [f"connect battery to {n}" for n in near if n != "battery"]
            actions += [f"connect {n} to light bulb" for n in near if n not in ("light bulb", "battery")]
        return actions


def task_text(task: dict) -> str:
    proc, item, focus = task["procedure"], task["item"], task["focus"]
    if proc in ("boil", "melt", "freeze"):
        return (f"Your task is to {proc} {item}. First, focus on the substance. "
                f"Then, take actions that will cause it to change its state of matter.")
    if proc == "conductivity":
        return (f"Your task is to determine if the {item} is electrically conductive. The {item} is located around "
                f"the {task['room']}. First, focus on the {item}. If it is electrically conductive, place it in the "
                f"{task['yes']}. If it is not, place it in the {task['no']}.")
    if proc == "grow":
        return (f"Your task is to grow {a_or_an(item)} plant from seed. First, focus on the {focus}. "
                f"Then, make changes to the environment that grow the plant until it is an adult.")
    if proc == "find":
        return (f"Your task is to find the {focus}. It is in the {task['rooms'][0]} or the {task['rooms'][1]}. "
                f"First, focus on the {focus}. Then, move it to the {task['box']} in the {task['box_room']}.")
    return f"Your task is to use chemistry to create {item} paint. When you are done, focus on the {item} paint."
