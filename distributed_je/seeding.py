"""Seeded random generators derived from (seed, rank, epoch): no draw uses global state."""

from __future__ import annotations

import numpy as np
import torch

# Stream tags keep the draws of different consumers independent for the same (seed, rank, epoch).
STREAM_TRAIN = 0
STREAM_VALIDATION = 1
STREAM_LOADER = 2
STREAM_INIT = 3
STREAM_EVALUATION = 4


def derive_seed(seed: int, rank: int = 0, epoch: int = 0, stream: int = STREAM_TRAIN) -> int:
    """A 63-bit seed that differs for every (seed, rank, epoch, stream)."""
    sequence = np.random.SeedSequence([seed, rank, epoch, stream])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def torch_generator(seed: int, rank: int = 0, epoch: int = 0, stream: int = STREAM_TRAIN,
                    device: torch.device | str = "cpu") -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, rank, epoch, stream))
    return generator


def numpy_generator(seed: int, rank: int = 0, epoch: int = 0, stream: int = STREAM_LOADER) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, rank, epoch, stream]))
