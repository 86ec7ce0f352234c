"""Web shopping: a miniature WebShop (search, browse, choose options, buy; partial reward).

A task is a shopping instruction plus a small catalog of products made for it:
the one that fits, near misses (one attribute missing, over the price cap, the
wanted option value not offered) and products of other types. Pages:

    search page    search[keywords]
    results page   [Back to Search] [Next >] [< Prev] and one [product id] per product, 3 per page,
                   ranked by how many keywords occur in the title (ties: product id order)
    product page   [Back to Search] [< Prev] (back to the results) [option value]... [Buy Now]

Reward (on Buy Now, as WebShop's attribute matching, with the product type as one
more requirement): the fraction of the requirements the bought product meets, among
product type, each requested attribute, each requested option value (selected on the
product page) and the price cap. Never bought: 0. The expert always reaches 1.0.

Splits. Each product type has one held-out attribute, `UNSEEN` (a type, attribute
pair): running shoes/waterproof, t-shirt/breathable, backpack/lightweight, water
bottle/insulated, headphones/foldable, phone case/slim fit, coffee mug/large
capacity, yoga mat/non-slip, desk lamp/foldable, shampoo/organic. Each of these
attributes is requested for other product types in train. `test_unseen`
instructions always request the held-out attribute of their type; in `train` and
`test_seen` no instruction requests it and no product of that type has it.
`test_seen` tasks are new instructions and catalogs (other random seeds).
"""

from __future__ import annotations

import re

from envs.base import TextEnv, quote, task_rng

INSTRUCTION = """You are web shopping. You are given an instruction that describes a product to buy, and you browse a web shop to buy it.
Each observation shows the current page; its buttons are written in brackets, e.g. [Buy Now].
An action has one of these forms:
search[keywords]
click[value]
where you can only search on the search page, and value must be a button on the current page: a product id, an option value, Buy Now, Back to Search, Next >, or < Prev.
Choose search keywords carefully, check that the product, its options and its price match the instruction, then buy it. If an action is not valid, nothing happens.

Your response should use the following format:

Thought: I think ...
Action: click[something]"""

# product type -> attributes (that can be requested) and options (name -> values)
PRODUCTS = {
    "running shoes": (["lightweight", "waterproof", "non-slip", "breathable", "memory foam"],
                      {"color": ["black", "white", "blue", "red", "grey"], "size": ["7", "8", "9", "10", "11"]}),
    "t-shirt": (["cotton", "slim fit", "machine washable", "short sleeve", "breathable", "organic"],
                {"color": ["black", "white", "navy", "green", "grey"], "size": ["small", "medium", "large", "x-large"]}),
    "backpack": (["waterproof", "lightweight", "laptop sleeve", "anti-theft", "large capacity"],
                 {"color": ["black", "grey", "navy", "green", "pink"]}),
    "water bottle": (["insulated", "bpa free", "leak proof", "lightweight", "stainless steel"],
                     {"color": ["black", "white", "blue", "pink", "green"], "size": ["500 ml", "750 ml", "1 l"]}),
    "headphones": (["wireless", "noise cancelling", "waterproof", "foldable", "long battery"],
                   {"color": ["black", "white", "blue", "red"]}),
    "phone case": (["shockproof", "slim fit", "magnetic", "clear", "waterproof"],
                   {"color": ["black", "clear", "pink", "blue"], "model": ["iphone 14", "iphone 15", "galaxy s23"]}),
    "coffee mug": (["ceramic", "insulated", "dishwasher safe", "microwave safe", "large capacity"],
                   {"color": ["white", "black", "blue", "green"], "size": ["12 oz", "16 oz", "20 oz"]}),
    "yoga mat": (["non-slip", "eco friendly", "extra thick", "lightweight", "foldable"],
                 {"color": ["purple", "blue", "black", "pink", "green"]}),
    "desk lamp": (["led", "dimmable", "usb charging", "foldable", "eye caring"],
                  {"color": ["black", "white", "silver"]}),
    "shampoo": (["sulfate free", "organic", "paraben free", "for dry hair", "long lasting"],
                {"scent": ["lavender", "coconut", "mint", "unscented"], "size": ["8 oz", "16 oz", "32 oz"]}),
}
UNSEEN = frozenset({
    ("running shoes", "waterproof"), ("t-shirt", "breathable"), ("backpack", "lightweight"),
    ("water bottle", "insulated"), ("headphones", "foldable"), ("phone case", "slim fit"),
    ("coffee mug", "large capacity"), ("yoga mat", "non-slip"), ("desk lamp", "foldable"),
    ("shampoo", "organic"),
})
BRANDS = ["Acme", "Zephyr", "Nordic", "Bolt", "Luna", "Peak", "Orbit", "Vista", "Koa", "Maple", "Echo", "Pixel"]
PER_PAGE = 3
STOPWORDS = {"a", "an", "the", "i", "need", "want", "with", "and", "for", "of", "in", "me", "find", "is", "that"}


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower())) - STOPWORDS


def allowed_attributes(ptype: str, split: str) -> list[str]:
    """The attributes a product of `ptype` may have in `split` (test_unseen: all)."""
    attrs = PRODUCTS[ptype][0]
    return attrs if split == "test_unseen" else [a for a in attrs if (ptype, a) not in UNSEEN]


class WebShopEnv(TextEnv):
    name = "webshop"
    instruction = INSTRUCTION
    max_steps = 15
    unmatched_action = "Invalid action"
    observation_prefix = "Observation:\n"  # as the official WebShop environment

    # ---- task generation --------------------------------------------------------
    def make_task(self, split: str, index: int) -> dict:
        """Goal and catalog of one task (a pure function of seed, split, index)."""
        rng = task_rng(self.seed, self.name, split, index)
        ptype = rng.choice(sorted(PRODUCTS))
        attrs, options = PRODUCTS[ptype]
        pool = allowed_attributes(ptype, split)
        if split == "test_unseen":
            held = next(a for a in attrs if (ptype, a) in UNSEEN)
            others = [a for a in pool if a != held]
            goal_attrs = [held] + rng.sample(others, rng.randint(0, 2))
        else:
            goal_attrs = rng.sample(pool, rng.randint(1, 3))
        goal_attrs = [a for a in attrs if a in goal_attrs]  # canonical order
        goal_opts = {name: rng.choice(values) for name, values in options.items()}
        price_cap = float(rng.choice([20, 30, 40, 50, 60, 80, 100]))
        goal = {"type": ptype, "attributes": goal_attrs, "options": goal_opts, "price": price_cap}

        def product(ptype, attributes, price, drop_option=None):
            opts = {}
            for name, values in PRODUCTS[ptype][1].items():
                chosen = rng.sample(values, rng.randint(2, len(values)))
                if ptype == goal["type"]:
                    chosen = [v for v in chosen if v != goal_opts[name]]
                    if name != drop_option:
                        chosen.insert(rng.randint(0, len(chosen)), goal_opts[name])
                opts[name] = chosen
            pid = "B0" + "".join(rng.choice("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789") for _ in range(6))
            attributes = [a for a in PRODUCTS[ptype][0] if a in attributes]
            title = f"{rng.choice(BRANDS)} {' '.join(attributes)} {ptype}".title()
            return {"id": pid, "type": ptype, "attributes": attributes, "options": opts,
                    "price": round(price, 2), "title": title}

        cheap = lambda: rng.uniform(0.3, 0.95) * price_cap  # noqa: E731
        extra = lambda: rng.sample([a for a in pool if a not in goal_attrs], rng.randint(0, 1))  # noqa: E731
        catalog = [product(ptype, goal_attrs + extra(), cheap())]  # the one that fits
        for _ in range(rng.randint(0, 2)):  # too expensive
            catalog.append(product(ptype, goal_attrs + extra(), rng.uniform(1.1, 2.0) * price_cap))
        if rng.random() < 0.5:  # fits, but the wanted value of one option is not offered
            catalog.append(product(ptype, goal_attrs + extra(), cheap(), drop_option=rng.choice(sorted(options))))
        for _ in range(rng.randint(2, 4)):  # one requested attribute missing
            missing = rng.choice(goal_attrs)
            have = [a for a in goal_attrs if a != missing] + rng.sample([a for a in pool if a not in goal_attrs], 1)
            catalog.append(product(ptype, have, rng.uniform(0.3, 1.3) * price_cap))
        for other in rng.sample([t for t in PRODUCTS if t != ptype], 4):  # other product types
            other_pool = allowed_attributes(other, split)
            catalog.append(product(other, rng.sample(other_pool, 2), rng.uniform(0.3, 1.3) * price_cap))
        seen_ids, unique = set(), []
        for p in catalog:
            if p["id"] not in seen_ids:
                seen_ids.add(p["id"])
                unique.append(p)
        return {"goal": goal, "catalog": unique}

    def start(self, task: dict) -> str:
        self.page = "search"  # "search" | "results" | "product"
        self.results: list[dict] = []
        self.page_no = 1
        self.product = None
        self.selected: dict[str, str] = {}
        self.reward = 0.0
        self.purchase: tuple[dict, dict] | None = None  # (product, selected options) once bought
        return f"WebShop\nInstruction: {goal_text(task['goal'])}\n[Search]"

    # ---- pages --------------------------------------------------------------------
    def search(self, query: str) -> list[dict]:
        """Products sharing at least one keyword with the query, most shared first."""
        q = words(query)
        scored = [(len(q & words(p["title"])), p["id"], p) for p in self.task["catalog"]]
        return [p for score, _, p in sorted(scored, key=lambda s: (-s[0], s[1])) if score > 0]

    def results_page(self) -> str:
        n_pages = max(1, -(-len(self.results) // PER_PAGE))
        lines = ["[Back to Search]", f"Page {self.page_no} of {n_pages} (total results: {len(self.results)})"]
        if self.page_no > 1:
            lines.append("[< Prev]")
        if self.page_no < n_pages:
            lines.append("[Next >]")
        lines += [f"[{p['id']}] {p['title']} | ${p['price']:.2f}" for p in self.on_page()]
        return "\n".join(lines)

    def on_page(self) -> list[dict]:
        return self.results[(self.page_no - 1) * PER_PAGE: self.page_no * PER_PAGE]

    def product_page(self) -> str:
        p = self.product
        lines = ["[Back to Search]", "[< Prev]", p["title"], f"Price: ${p['price']:.2f}"]
        lines += [f"{name}: " + " ".join(f"[{v}]" for v in values) for name, values in p["options"].items()]
        return "\n".join(lines + ["[Buy Now]"])

    def clickables(self) -> list[str]:
        if self.page == "results":
            page = self.results_page()
        elif self.page == "product":
            page = self.product_page()
        else:
            return []
        return re.findall(r"\[([^\]]+)\]", page)

    # ---- steps --------------------------------------------------------------------
    def current_reward(self) -> float:
        return self.reward

    def act(self, action: str) -> tuple[str, bool, dict]:
        m = re.fullmatch(r"(search|click)\[(.*)\]", action, flags=re.IGNORECASE)
        if m is None:
            return (f"Invalid action: {quote(action)}. Valid actions look like search[keywords] or click[value].",
                    False, {"valid": False})
        verb, arg = m[1].lower(), m[2].strip()
        if verb == "search":
            if self.page != "search" or not words(arg):
                return "Invalid action: you can only search on the search page, with keywords.", False, {"valid": False}
            self.results, self.page_no, self.page = self.search(arg), 1, "results"
            return self.results_page(), False, {"valid": True}
        value = next((c for c in self.clickables() if c.lower() == arg.lower()), None)
        if value is None:
            return f"Invalid action: there is no [{quote(arg)}] button on this page.", False, {"valid": False}
        return self.click(value)

    def click(self, value: str) -> tuple[str, bool, dict]:
        if value == "Back to Search":
            self.page = "search"
            return "WebShop\n[Search]", False, {"valid": True}
        if value == "Buy Now":
            self.purchase = (self.product, dict(self.selected))
            self.reward = match_score(self.task["goal"], self.product, self.selected)
            return f"Thank you for shopping with us! Your score: {self.reward:.2f}", True, {"valid": True}
        if value == "< Prev" and self.page == "product":
            self.page = "results"
            return self.results_page(), False, {"valid": True}
        if value in ("< Prev", "Next >"):
            self.page_no += 1 if value == "Next >" else -1
            return self.results_page(), False, {"valid": True}
        if self.page == "results":
            self.product = next(p for p in self.on_page() if p["id"] == value)
            self.selected, self.page = {}, "product"
            return self.product_page(), False, {"valid": True}
        name = next(n for n, values in self.product["options"].items() if value in values)
        self.selected[name] = value
        return f"You have selected {name}: {value}.", False, {"valid": True}

    # ---- expert ---------------------------------------------------------------------
    def expert_steps(self):
        goal = self.task["goal"]
        query = " ".join(goal["attributes"] + [goal["type"]])
        yield (f"I need {describe_goal(goal)}. I will search for {query}.", f"search[{query}]")
        rejected = set()
        while True:
            fits = [p for p in self.on_page() if p["id"] not in rejected and p["price"] <= goal["price"]
                    and words(" ".join(goal["attributes"] + [goal["type"]])) <= words(p["title"])]
            if not fits:
                other = "other " if any(p["id"] in rejected for p in self.on_page()) else ""
                yield (f"No {other}product on this page fits the instruction and the budget. "
                       "I will look at the next page."), "click[Next >]"
                continue
            p = fits[0]
            yield (f"{p['id']} is {a_or_an_type(goal)} with the attributes I need, and it costs "
                   f"${p['price']:.2f}, under ${goal['price']:.2f}. I will check it.", f"click[{p['id']}]")
            missing = [(n, v) for n, v in goal["options"].items() if v not in p["options"][n]]
            if missing:
                name, value = missing[0]
                rejected.add(p["id"])
                yield f"This product does not offer {name} {value}. I will go back and check another product.", \
                    "click[< Prev]"
                continue
            for name, value in goal["options"].items():
                yield f"The instruction asks for {name} {value}, so I select it.", f"click[{value}]"
            yield "The product matches the type, attributes, options and price. I will buy it.", "click[Buy Now]"
            return

    # ---- random baseline ----------------------------------------------------------
    def admissible_actions(self) -> list[str]:
        if self.page == "search":
            return [f"search[{self.task['goal']['type']}]"]
        return [f"click[{c}]" for c in self.clickables()]

    def random_action(self, rng) -> str:
        """Search for 1-3 random vocabulary words, or click a random button."""
        if self.page == "search":
            vocab = sorted({w for t, (attrs, _) in PRODUCTS.items() for w in words(" ".join(attrs + [t]))})
            return f"search[{' '.join(rng.sample(vocab, rng.randint(1, 3)))}]"
        return rng.choice(self.admissible_actions())


def requirements(goal: dict, product: dict, selected: dict) -> list[tuple[str, bool]]:
    """(kind, met) for each requirement of the goal: the type, each requested attribute, each
    requested option value (selected on the product page), the price cap."""
    return ([("type", product["type"] == goal["type"])]
            + [("attribute", a in product["attributes"]) for a in goal["attributes"]]
            + [("option", selected.get(name) == value) for name, value in goal["options"].items()]
            + [("price", product["price"] <= goal["price"])])


def match_score(goal: dict, product: dict, selected: dict) -> float:
    """Fraction of requirements met: type, each attribute, each option value, price."""
    met = [ok for _, ok in requirements(goal, product, selected)]
    return sum(met) / len(met)


def unmet_requirements(goal: dict, product: dict, selected: dict) -> list[str]:
    """The kinds of requirement a purchase misses, each once, in requirements' order: "type",
    "attribute", "option", "price". [] for an exact purchase (reward 1.0)."""
    return list(dict.fromkeys(kind for kind, ok in requirements(goal, product, selected) if not ok))


def a_or_an_type(goal: dict) -> str:
    return f"a {goal['type']}" if not goal["type"].endswith("s") else goal["type"]


def describe_goal(goal: dict) -> str:
    opts = ", ".join(f"{n} {v}" for n, v in goal["options"].items())
    return f"{' '.join(goal['attributes'])} {goal['type']} with {opts}, under ${goal['price']:.2f}"


def goal_text(goal: dict) -> str:
    """The instruction, in the style of WebShop's."""
    opts = ", and ".join(f"{n}: {v}" for n, v in goal["options"].items())
    return (f"i need {', '.join(goal['attributes'])} {goal['type']} with {opts}, "
            f"and price lower than {goal['price']:.2f} dollars")
