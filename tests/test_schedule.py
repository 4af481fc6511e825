"""The LR schedule: warm-up -> plateau -> decay, as a pure function of the step."""

from __future__ import annotations

import math

import pytest
import torch

from ser_ray.training.schedule import build_scheduler, lr_multiplier, phase_steps

TOTAL = 1000  # 10% = 100 warm-up steps, decay from step 700


def test_values_at_0_10_50_70_100_percent():
    m = lambda step, **kw: lr_multiplier(step, TOTAL, **kw)  # noqa: E731
    assert m(0) == pytest.approx(1 / 101)  # first update already moves
    assert m(50) == pytest.approx(51 / 101)
    assert m(100) == 1.0  # peak reached at 10%
    assert m(500) == 1.0  # plateau
    assert m(700) == 1.0  # decay starts at 70%
    assert m(1000) == pytest.approx(0.05)  # final scale at 100%
    assert m(850) == pytest.approx(1 - 0.95 * 0.5)  # linear: half-way


@pytest.mark.parametrize(
    ("shape", "halfway"),
    [("linear", 0.55), ("cosine", 0.1 + 0.9 * 0.5), ("exponential", math.sqrt(0.1))],
)
def test_decay_shapes(shape, halfway):
    kw = dict(final_lr_scale=0.1, decay_shape=shape)
    assert lr_multiplier(700, TOTAL, **kw) == pytest.approx(1.0)
    assert lr_multiplier(850, TOTAL, **kw) == pytest.approx(halfway)
    assert lr_multiplier(1000, TOTAL, **kw) == pytest.approx(0.1)
    values = [lr_multiplier(s, TOTAL, **kw) for s in range(700, 1001)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))  # monotone decay


def test_other_fractions_and_errors():
    assert phase_steps(200, 0.05, 0.5) == (10, 100)
    assert lr_multiplier(9, 200, warmup_frac=0.05, decay_start_frac=0.5) == pytest.approx(10 / 11)
    assert lr_multiplier(0, 10, warmup_frac=0.0) == 1.0  # no warm-up
    with pytest.raises(ValueError, match="decay_shape"):
        lr_multiplier(0, 10, decay_shape="step")
    with pytest.raises(ValueError, match="decay_start_frac"):
        lr_multiplier(0, 10, warmup_frac=0.5, decay_start_frac=0.3)


def test_lambda_lr_drives_two_peaks():
    enc, head = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [enc], "lr": 1e-4}, {"params": [head], "lr": 1e-3}])
    sched = build_scheduler(opt, total_steps=20)  # warm-up 2 steps, decay from step 14
    seen = []
    for _ in range(20):
        seen.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx([1e-4 / 3, 1e-3 / 3])
    assert seen[2] == pytest.approx([1e-4, 1e-3])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-6, 5e-5])  # step 20: 5%
    state = sched.state_dict()
    assert state["last_epoch"] == 20
