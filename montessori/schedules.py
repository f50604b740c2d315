"""Learning-rate schedules for warm-up, student SFT and teacher DPO, as `LambdaLR` factors.

Trainer convention: optimizer step `k` (0-based) runs at `peak * factor(k)`; the scheduler is
stepped after each optimizer step, so after `N` steps the optimizer holds `peak * factor(N)`.

Why not transformers' `lr_scheduler_type="warmup_stable_decay"` (which TRL uses)? In
transformers 5.24 `get_wsd_schedule` starts the warm-up at the floor (`min_lr_ratio * peak`,
1e-9 for DPO: a wasted first step), decays with a cosine by default, needs `num_decay_steps`
as an absolute count, and reaches the floor only after the last step. Ours:

- warm-up: linear, step `k < W` runs at `peak * (k + 1) / W`: no step at (almost) zero lr, and
  the last warm-up step runs at the peak;
- stable: `peak` for `S` steps;
- decay: linear from the peak, step `j` of `D` runs at `peak * (1 - (1 - floor) * (j + 1) / D)`,
  so the last training step runs exactly at the floor (`min_lr_ratio * peak`);
- after the last step the floor stays in force.

Phase lengths are `W = round(warmup * N)`, `D = round(decay * N)` (half up), `S = N - W - D`.

`linear_warmup` (the original warm-up: a linear ramp to the peak over the whole run) is the
same ramp with `W = N`; the peak is then the lr in force at the end, the lr the influence stage
steps with.
"""

from __future__ import annotations

import math

from .errors import ConfigError

DEFAULT_WSD = {"warmup": 0.1, "stable": 0.5, "decay": 0.4, "min_lr_ratio": 0.001}


def _half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


class LrFactor:
    """factor(step) for a linear warm-up, a constant stable phase and a linear decay to a floor."""

    def __init__(self, warmup_steps: int, stable_steps: int, decay_steps: int, min_lr_ratio: float):
        if min(warmup_steps, stable_steps, decay_steps) < 0:
            raise ValueError(f"negative phase length: {warmup_steps}/{stable_steps}/{decay_steps}")
        self.warmup_steps = warmup_steps
        self.stable_steps = stable_steps
        self.decay_steps = decay_steps
        self.min_lr_ratio = min_lr_ratio

    @property
    def total_steps(self) -> int:
        return self.warmup_steps + self.stable_steps + self.decay_steps

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        step -= self.warmup_steps
        if step < self.stable_steps:
            return 1.0
        step -= self.stable_steps
        if step < self.decay_steps:
            return 1.0 - (1.0 - self.min_lr_ratio) * (step + 1) / self.decay_steps
        return self.min_lr_ratio if self.decay_steps else 1.0

    def __repr__(self) -> str:
        return (f"LrFactor(warmup={self.warmup_steps}, stable={self.stable_steps}, "
                f"decay={self.decay_steps}, min_lr_ratio={self.min_lr_ratio})")


def wsd_factor(num_training_steps: int, warmup: float, stable: float, decay: float,
               min_lr_ratio: float, config_key: str = "schedule") -> LrFactor:
    fractions = {"warmup": warmup, "stable": stable, "decay": decay}
    for name, value in fractions.items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"config key '{config_key}.{name}' must be in [0, 1], got {value}")
    if not math.isclose(warmup + stable + decay, 1.0, abs_tol=1e-6):
        raise ConfigError(
            f"config key '{config_key}': warmup + stable + decay must be 1, got {warmup + stable + decay}"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"config key '{config_key}.min_lr_ratio' must be in [0, 1], got {min_lr_ratio}")
    warmup_steps = _half_up(warmup * num_training_steps)
    decay_steps = min(_half_up(decay * num_training_steps), num_training_steps - warmup_steps)
    return LrFactor(warmup_steps, num_training_steps - warmup_steps - decay_steps, decay_steps, min_lr_ratio)


def linear_warmup_factor(num_training_steps: int) -> LrFactor:
    return LrFactor(num_training_steps, 0, 0, 1.0)


def schedule_factor(schedule, num_training_steps: int, config_key: str = "schedule") -> LrFactor:
    """The factor for a config `schedule`: `linear_warmup`, `wsd` (paper defaults) or a WSD dict."""
    if num_training_steps < 1:
        raise ValueError(f"num_training_steps must be >= 1, got {num_training_steps}")
    if schedule == "linear_warmup":
        return linear_warmup_factor(num_training_steps)
    if schedule == "wsd":
        schedule = DEFAULT_WSD
    if isinstance(schedule, dict):
        unknown = set(schedule) - set(DEFAULT_WSD)
        if unknown:
            raise ConfigError(f"config key '{config_key}': unknown keys {sorted(unknown)} "
                              f"(expected {sorted(DEFAULT_WSD)})")
        merged = {**DEFAULT_WSD, **schedule}
        return wsd_factor(num_training_steps, float(merged["warmup"]), float(merged["stable"]),
                          float(merged["decay"]), float(merged["min_lr_ratio"]), config_key)
    raise ConfigError(
        f"config key '{config_key}': expected 'linear_warmup', 'wsd' or a mapping "
        f"{{warmup, stable, decay, min_lr_ratio}}, got {schedule!r}"
    )


def make_scheduler(optimizer, schedule, num_training_steps: int, config_key: str = "schedule"):
    from torch.optim.lr_scheduler import LambdaLR

    return LambdaLR(optimizer, schedule_factor(schedule, num_training_steps, config_key))
