"""Text environments with a common interface (see envs/base.py).

    from envs import make_env
    env = make_env("household", seed=0)
    task = env.reset(env.task_ids("train")[0])
    obs, reward, done, info = env.step("go to cabinet 1")

Built in (pure Python): "webshop", "household", "science". Optional:
"scienceworld", an adapter for the real ScienceWorld (`pip install -r
requirements-scienceworld.txt`, needs Java).
"""

from contextlib import contextmanager

from envs.base import SPLITS, TextEnv
from envs.household import HouseholdEnv
from envs.science import ScienceEnv
from envs.scienceworld import ScienceWorldAdapter  # imports the scienceworld package only when built
from envs.webshop import WebShopEnv

REGISTRY = {"webshop": WebShopEnv, "household": HouseholdEnv, "science": ScienceEnv, "scienceworld": ScienceWorldAdapter}
ENV_NAMES = tuple(REGISTRY)


def env_class(name: str) -> type[TextEnv]:
    """An environment's class by name (its class attributes describe it without building it)."""
    if name not in REGISTRY:
        raise ValueError(f"unknown environment {name!r}; known: {', '.join(ENV_NAMES)}")
    return REGISTRY[name]


def make_env(name: str, seed: int = 0, **sizes) -> TextEnv:
    """An environment by name; `sizes` are constructor arguments (train=, test_seen=, test_unseen= for the built-ins)."""
    return env_class(name)(seed=seed, **sizes)


@contextmanager
def opened(name: str, seed: int = 0, **sizes):
    """`with opened("scienceworld") as env:` an environment closed on leaving (the real ScienceWorld's Java)."""
    env = make_env(name, seed=seed, **sizes)
    try:
        yield env
    finally:
        if hasattr(env, "close"):
            env.close()


def env_options(name: str, seed: int = 0) -> dict:
    """The settings beyond name and seed that decide an environment's tasks (`TextEnv.options`)."""
    env = make_env(name, seed=seed)
    return env.options() if hasattr(env, "options") else {}


__all__ = ["ENV_NAMES", "SPLITS", "TextEnv", "env_class", "env_options", "make_env", "opened"]
