"""One config seed; every stage and shard derives its own from it, stably across processes."""

from __future__ import annotations

import hashlib
import random


def derive_seed(base_seed: int, *labels) -> int:
    """A 31-bit seed from the base seed and labels (stage name, shard, ...); not Python's salted hash."""
    text = "|".join([str(base_seed), *map(str, labels)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
