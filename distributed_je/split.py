"""The validation split: fixed by a hash of each cell's name, so it is identical across runs,
worker counts, loaders and stores that hold the same cells."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np


def name_hashes(cell_names: Sequence[str]) -> np.ndarray:
    """A uint32 hash of each cell name (the first 4 bytes of its blake2b digest)."""
    return np.fromiter(
        (int.from_bytes(hashlib.blake2b(str(n).encode(), digest_size=4).digest(), "little") for n in cell_names),
        dtype=np.uint32, count=len(cell_names),
    )


def validation_threshold(fraction: float) -> int:
    """Cells whose name hash is below this are held out."""
    return int(round(fraction * 2**32))


def validation_mask(cell_names: Sequence[str], fraction: float) -> np.ndarray:
    """True for held-out cells."""
    return name_hashes(cell_names) < validation_threshold(fraction)
