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


def recorded_checkpoints(run_dir: Path) -> str:
    """Ray Train's checkpoint snapshot of a run, as text ('' before it records a checkpoint). A
    checkpoint's directory appears when its upload starts; a run restarted or run again resumes
    only from a checkpoint that the snapshot records."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    return snapshot.read_text() if snapshot.exists() else ""


@pytest.fixture
def pbmc3k_path() -> Path:
    return shared_data("pbmc3k_labeled.h5ad")


@pytest.fixture(scope="session")
def pbmc_store(tmp_path_factory) -> str:
    """pbmc3k converted to a store with 500 highly variable genes, shared by the session's tests."""
    from distributed_je.convert import convert

    dest = str(tmp_path_factory.mktemp("store") / "pbmc3k.zarr")
    convert(shared_data("pbmc3k_labeled.h5ad"), dest, n_top_genes=500, labels_key="cell_type", progress=False)
    return dest


@pytest.fixture
def shutdown_ray():
    """For tests that run a command which starts Ray in this process: stop it afterwards, so the
    next test that starts its own cluster finds none."""
    yield
    import ray

    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
