"""The main job on the embedded default: data -> zarr store -> JE and SCVI models streamed from
the store -> depth response, in one process.

Later stages (Ray-distributed training, an Optuna tune, the full evaluation report) plug in
here as they land.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from distributed_je.config import Config
from distributed_je.convert import convert
from distributed_je.counts import read_store
from distributed_je.evaluation import depth_response
from distributed_je.loader import StoreLoader
from distributed_je.loop import build_model, build_optimizer, epoch_line, fit
from distributed_je.split import validation_mask
from distributed_je.store import open_store
from distributed_je.synthetic import synthetic_counts

DEMO_VARIANTS = ("scvi", "je")


def build_store(data: str | None, *, labels_key: str | None, batch_key: str | None, n_top_genes: int | None,
                out: Path, seed: int) -> Config:
    """Convert the demo's data (a generated dataset unless ``data`` names an h5ad) into ``out/store.zarr``."""
    if data is None:
        matrix = synthetic_counts(seed=seed)
        data = str(out / "synthetic.h5ad")
        matrix.to_anndata().write_h5ad(data)
        labels_key, batch_key, n_top_genes = "cell_type", "batch", None
        print(f"data: synthetic, {matrix.n_cells:,} cells x {matrix.n_genes:,} genes, "
              f"{len(matrix.label_categories)} cell types, {matrix.n_batches} batches, wide depth range")
    elif labels_key is None:
        raise ValueError("--labels-key is needed with --data: the demo scores label transfer at low depth")
    store = str(out / "store.zarr")
    report = convert(data, store, n_top_genes=n_top_genes, batch_key=batch_key, labels_key=labels_key,
                     overwrite=True, progress=False)
    print(f"store: {store} ({report.n_cells:,} cells x {report.n_genes:,} genes)")
    return {"data.store": store, "data.batch_key": batch_key, "data.labels_key": labels_key}


def train_from_store(config: Config):
    store = open_store(config.data.store)
    seed = config.experiment.seed
    train = StoreLoader.from_config(store, config.data, split="train", seed=seed)
    val = StoreLoader.from_config(store, config.data, split="val", seed=seed)
    model = build_model(config, store.n_genes, train.n_batches_store)
    fit(model, build_optimizer(model, config.optim), config=config, train_batches=train.epoch,
        val_batches=lambda: val.epoch(0),
        on_epoch_end=lambda state, metrics: print(f"  [{config.model.variant}] {epoch_line(metrics)}", flush=True))
    return model


def run_demo(config: Config, *, data: str | None, labels_key: str | None, batch_key: str | None,
             n_top_genes: int | None, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    config = config.replace(**build_store(data, labels_key=labels_key, batch_key=batch_key,
                                          n_top_genes=n_top_genes, out=out, seed=config.experiment.seed))
    cells = read_store(config.data.store, batch_key=config.data.batch_key, labels_key=config.data.labels_key)
    held_out = validation_mask(cells.cell_names, config.data.validation_fraction)
    train, val = cells.subset_cells(np.flatnonzero(~held_out)), cells.subset_cells(np.flatnonzero(held_out))
    print(f"{train.n_cells:,} training and {val.n_cells:,} held-out cells")

    report = {"config": config.to_dict(), "n_train": train.n_cells, "n_held_out": val.n_cells, "variants": {}}
    for variant in DEMO_VARIANTS:
        variant_config = config.replace(**{"model.variant": variant})
        print(f"training {variant} for {config.train.max_epochs} epochs, streaming from the store")
        model = train_from_store(variant_config)
        rows = depth_response(model, train, val, seed=config.experiment.seed)
        report["variants"][variant] = [asdict(row) for row in rows]

    print(format_depth_table(report["variants"]))
    (out / "demo_report.json").write_text(json.dumps(report, indent=2))
    print(f"report: {out / 'demo_report.json'}")
    return report


def format_depth_table(variants: dict[str, list[dict]]) -> str:
    """Balanced accuracy and distance to f(0) of held-out cells by depth, one column pair per variant."""
    names = list(variants)
    header = "depth (UMIs) | " + " | ".join(f"{v} bal.acc | {v} dist f(0)" for v in names)
    lines = [header, "-" * len(header)]
    for i, row in enumerate(variants[names[0]]):
        cells = " | ".join(
            f"{variants[v][i]['balanced_accuracy']:.3f} | {variants[v][i]['distance_to_bias_point']:.2f}" for v in names
        )
        lines.append(f"{row['depth']:>12} | {cells}")
    return "\n".join(lines)
