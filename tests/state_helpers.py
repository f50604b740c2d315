"""Reading a saved AdamW state whole, for tests that compare every moment (the pipeline itself reads
it tensor by tensor through AdamWStateFile)."""

from __future__ import annotations

from montessori.optim_state import AdamWStateFile


def load_adamw_state(path) -> dict:
    """The whole state as one dict (the earlier format's layout), read through AdamWStateFile."""
    saved = AdamWStateFile(path)
    moments = {name: saved.moments(name) for name in saved.names}
    return {"step": saved.step, "lr": saved.lr, "betas": saved.betas, "eps": saved.eps,
            "weight_decay": saved.weight_decay, "no_decay": saved.no_decay,
            "exp_avg": {n: m for n, (m, _) in moments.items()}, "exp_avg_sq": {n: v for n, (_, v) in moments.items()}}
