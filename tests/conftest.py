from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(name: str) -> Path:
    """A real dataset from ../shared/data, or a skip saying why when this machine lacks it."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"real data {path} is not on this machine (see ../shared/data/README.md)")
    return path


@pytest.fixture
def pbmc3k_path() -> Path:
    return shared_data("pbmc3k_labeled.h5ad")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
