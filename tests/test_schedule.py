"""eto_ref/schedule.py: learning-rate schedules, hand-computed and against transformers."""

import math

import pytest
import torch

from eto_ref.schedule import lr_at, warmup_steps


def test_cosine_schedule_key_values():
    total, ratio, base = 100, 0.03, 2e-5
    W = warmup_steps(total, ratio)
    assert W == 3  # ceil(0.03 * 100)
    assert lr_at(0, base, total, ratio, "cosine") == 0.0  # the first update has lr 0 (as transformers)
    assert lr_at(1, base, total, ratio, "cosine") == pytest.approx(base / 3)
    assert lr_at(W, base, total, ratio, "cosine") == pytest.approx(base)  # warmup end: peak
    mid = W + (total - W) / 2
    assert lr_at(int(mid), base, total, ratio, "cosine") == pytest.approx(
        base * 0.5 * (1 + math.cos(math.pi * (int(mid) - W) / (total - W))))
    assert lr_at(total, base, total, ratio, "cosine") == pytest.approx(0.0, abs=1e-12)  # cosine end
    assert lr_at(total - 1, base, total, ratio, "cosine") > 0


def test_constant_schedule_key_values():
    total, ratio, base = 50, 0.1, 1e-6
    assert warmup_steps(total, ratio) == 5
    assert lr_at(0, base, total, ratio, "constant") == 0.0
    assert lr_at(2, base, total, ratio, "constant") == pytest.approx(base * 2 / 5)
    for step in (5, 20, 49, 50):
        assert lr_at(step, base, total, ratio, "constant") == pytest.approx(base)
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_at(0, base, total, ratio, "linear")


def test_schedules_match_transformers():
    transformers = pytest.importorskip("transformers")
    p = torch.nn.Parameter(torch.zeros(1))
    for name, make, ratio in (("cosine", transformers.get_cosine_schedule_with_warmup, 0.03),
                              ("constant", transformers.get_constant_schedule_with_warmup, 0.1)):
        total = 77
        opt = torch.optim.SGD([p], lr=1.0)
        kwargs = dict(num_warmup_steps=warmup_steps(total, ratio))
        if name == "cosine":
            kwargs["num_training_steps"] = total
        sched = make(opt, **kwargs)
        for step in range(total):
            assert opt.param_groups[0]["lr"] == pytest.approx(lr_at(step, 1.0, total, ratio, name), abs=1e-12)
            opt.step()
            sched.step()


@pytest.mark.parametrize("name", ["cosine", "constant"])
def test_a_single_step_stage_trains_at_the_full_learning_rate(name):
    """One step in all (an ETO iteration with a handful of pairs): its update is not wasted at lr 0."""
    assert warmup_steps(1, 0.1) == 0
    assert lr_at(0, 1e-6, 1, 0.1, name) == pytest.approx(1e-6)
    assert warmup_steps(2, 0.1) == 1 and lr_at(0, 1e-6, 2, 0.1, name) == 0.0  # two steps: warmup as usual
