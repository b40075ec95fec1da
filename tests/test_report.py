"""``dje evaluate`` on a small trained model: report files, fields and their ranges."""

import json

import numpy as np
import pytest

from distributed_je.artifact import load_model, save_checkpoint
from distributed_je.cli import EXIT_BAD_INPUT, main
from distributed_je.config import load_config
from distributed_je.convert import convert
from distributed_je.counts import minibatches
from distributed_je.loop import build_model, build_optimizer, fit
from distributed_je.report import DEPTHS, FRACTIONS, RECONSTRUCTION_DEPTHS
from distributed_je.seeding import numpy_generator
from distributed_je.synthetic import synthetic_counts


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic store with cell types and two batches, and a model trained on it for 3 epochs."""
    directory = tmp_path_factory.mktemp("report")
    matrix = synthetic_counts(1200, 200, seed=0)
    matrix.to_anndata().write_h5ad(directory / "cells.h5ad")
    store = str(directory / "cells.zarr")
    convert(directory / "cells.h5ad", store, labels_key="cell_type", batch_key="batch", progress=False)
    config = load_config(None, ["train.max_epochs=3", f"data.store={store}", "data.batch_key=batch",
                                "data.labels_key=cell_type"])
    model = build_model(config, matrix.n_genes, matrix.n_batches)
    optimizer = build_optimizer(model, config.optim)
    state = fit(model, optimizer, config=config, val_batches=lambda: iter(()),
                train_batches=lambda e: minibatches(matrix, batch_size=128, rng=numpy_generator(0, 0, e)))
    save_checkpoint(directory / "model", model=model, optimizer=optimizer, state=state, config=config,
                    gene_names=matrix.gene_names, batch_categories=list(matrix.batch_categories))
    return directory / "model", store


def test_evaluate_writes_the_report(trained, tmp_path, capsys):
    checkpoint, store = trained
    out = tmp_path / "report"
    assert main(["evaluate", str(checkpoint), store, "--labels-key", "cell_type", "--condition-key", "batch",
                 "--out", str(out)]) == 0
    assert "## Depth response" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    rows = report["depth_response"]
    assert [r["depth"] for r in rows] == [str(d) for d in DEPTHS] + [f"{f:.0%}" for f in FRACTIONS] + ["full"]
    assert report["n_held_out"] == rows[0]["n_cells"] > 50 and report["n_reference"] > 5 * report["n_held_out"]
    for row in rows:
        assert 0 <= row["balanced_accuracy"] <= 1 and 0 <= row["accuracy"] <= 1 and 0 <= row["knn_kept"] <= 1
        assert 0 <= row["condition_auc"] <= 1 and row["distance_to_bias_point"] >= 0
    full = rows[-1]
    assert full["knn_kept"] == 1.0  # the full-depth neighbourhood of itself
    # thinned to 10 and 100 UMIs in expectation: medians within binomial noise (sd ~3 and ~10 a cell)
    assert 5 <= rows[0]["median_umis"] <= 15 and 70 <= rows[3]["median_umis"] <= 130
    assert rows[0]["distance_to_bias_point"] < full["distance_to_bias_point"]  # shallow cells sit nearer f(0)
    assert len(report["bias_point"]) == 10
    recon = {r["depth"]: r for r in report["reconstruction"]}
    assert list(recon) == list(RECONSTRUCTION_DEPTHS)
    assert np.isfinite(recon["full"]["per_gene"]["nll"]).all() and len(recon["full"]["per_gene"]["nll"]) == 200
    assert recon["50"]["nll_per_cell"] < recon["full"]["nll_per_cell"]  # fewer counts, smaller NLL
    for name in ("report.md", "depth_response.png", "bias_point.png", "reconstruction.png"):
        assert (out / name).stat().st_size > 0


def test_evaluate_names_a_missing_column(trained, tmp_path, capsys):
    checkpoint, store = trained
    assert main(["evaluate", str(checkpoint), store, "--labels-key", "celltype", "--out", str(tmp_path)]) == EXIT_BAD_INPUT
    assert "obs has no column 'celltype'; available: batch, cell_type" in capsys.readouterr().err


def test_a_loaded_model_evaluates_an_h5ad_like_its_store(trained, tmp_path):
    from distributed_je.report import evaluate_model

    checkpoint, store = trained
    model = load_model(checkpoint)
    from_store = evaluate_model(model, store, labels_key="cell_type", out=tmp_path / "a")
    from_h5ad = evaluate_model(model, checkpoint.parent / "cells.h5ad", labels_key="cell_type", out=tmp_path / "b")
    assert from_store["depth_response"] == from_h5ad["depth_response"]
