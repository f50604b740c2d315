"""The lr schedules: values at every phase boundary, rounding of phase lengths, config errors."""

from __future__ import annotations

import pytest
import torch

from montessori.errors import ConfigError
from montessori.schedules import make_scheduler, schedule_factor

PAPER_WSD = {"warmup": 0.1, "stable": 0.5, "decay": 0.4, "min_lr_ratio": 0.001}


def test_wsd_values_at_phase_boundaries():
    factor = schedule_factor(PAPER_WSD, 20)
    assert (factor.warmup_steps, factor.stable_steps, factor.decay_steps) == (2, 10, 8)
    assert factor(0) == pytest.approx(0.5)          # first step: never a step at (almost) zero lr
    assert factor(1) == pytest.approx(1.0)          # last warm-up step reaches the peak
    assert factor(2) == pytest.approx(1.0)          # first stable step
    assert factor(11) == pytest.approx(1.0)         # last stable step
    assert factor(12) == pytest.approx(1.0 - 0.999 / 8)   # first decay step
    assert factor(15) == pytest.approx(1.0 - 0.999 * 4 / 8)
    assert factor(19) == pytest.approx(0.001)       # last step runs at the floor, 1/1000 of peak
    assert factor(20) == pytest.approx(0.001)       # and the floor stays in force after it
    values = [factor(k) for k in range(20)]
    assert all(a >= b for a, b in zip(values[2:], values[3:]))  # monotone after the warm-up


def test_linear_warmup_reaches_the_peak_on_the_last_step_and_stays():
    factor = schedule_factor("linear_warmup", 4)
    assert [factor(k) for k in range(5)] == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0])


@pytest.mark.parametrize("steps, phases", [
    (1, (0, 1, 0)),      # one step: at the peak
    (3, (0, 2, 1)),
    (5, (1, 2, 2)),      # 0.5 and 2.5 steps round half up
    (6, (1, 3, 2)),
    (100, (10, 50, 40)),
])
def test_wsd_phase_lengths(steps, phases):
    factor = schedule_factor(PAPER_WSD, steps)
    assert (factor.warmup_steps, factor.stable_steps, factor.decay_steps) == phases
    assert factor(steps - 1) == pytest.approx(0.001 if phases[2] else 1.0)


def test_named_wsd_is_the_paper_schedule():
    assert repr(schedule_factor("wsd", 20)) == repr(schedule_factor(PAPER_WSD, 20))


def test_scheduler_drives_the_optimizer_lr():
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = make_scheduler(optimizer, PAPER_WSD, 20)
    seen = []
    for _ in range(21):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    factor = schedule_factor(PAPER_WSD, 20)
    assert seen == pytest.approx([1e-3 * factor(k) for k in range(21)])
    assert scheduler.get_last_lr()[0] == pytest.approx(1e-6)


@pytest.mark.parametrize("schedule, message", [
    ({"warmup": 0.2, "stable": 0.5, "decay": 0.4}, "warmup + stable + decay must be 1"),
    ({"warmup": 0.1, "stable": 0.5, "decay": 0.4, "floor": 0.1}, "unknown keys"),
    ({"min_lr_ratio": 2.0}, "sft.schedule.min_lr_ratio"),
    ("cosine", "expected 'linear_warmup', 'wsd'"),
])
def test_bad_schedules_name_the_config_key(schedule, message):
    with pytest.raises(ConfigError, match="sft.schedule") as err:
        schedule_factor(schedule, 10, "sft.schedule")
    assert message in str(err.value)
