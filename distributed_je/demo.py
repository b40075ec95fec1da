"""The main job on the embedded default: data -> JE and SCVI models -> depth response, in one process.

Later stages (a zarr store, a Ray-distributed Optuna tune, the full evaluation report) plug
in here as they land.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from distributed_je.config import Config
from distributed_je.counts import CountMatrix, minibatches, read_h5ad, validation_mask
from distributed_je.evaluation import depth_response
from distributed_je.loop import build_model, build_optimizer, epoch_line, fit
from distributed_je.seeding import numpy_generator
from distributed_je.synthetic import synthetic_counts

DEMO_VARIANTS = ("scvi", "je")


def load_demo_data(data: str | None, *, labels_key: str | None, batch_key: str | None,
                   n_top_genes: int | None, seed: int) -> CountMatrix:
    if data is None:
        print("data: synthetic (3,000 cells x 1,000 genes, 6 cell types, 2 batches, depth 20 to ~20,000 UMIs)")
        return synthetic_counts(seed=seed)
    if labels_key is None:
        raise ValueError("--labels-key is needed with --data: the demo scores label transfer at low depth")
    print(f"data: {data} (labels {labels_key!r}, batches {batch_key!r}, {n_top_genes} highly variable genes)")
    return read_h5ad(data, batch_key=batch_key, labels_key=labels_key, n_top_genes=n_top_genes)


def train_in_process(config: Config, train: CountMatrix, val: CountMatrix):
    model = build_model(config, train.n_genes, train.n_batches)
    optimizer = build_optimizer(model, config.optim)
    batch_size, seed = config.data.batch_size, config.experiment.seed
    fit(
        model, optimizer, config=config,
        train_batches=lambda epoch: minibatches(train, batch_size=batch_size, rng=numpy_generator(seed, 0, epoch),
                                                drop_last=True),
        val_batches=lambda: minibatches(val, batch_size=batch_size),
        on_epoch_end=lambda state, metrics: print(f"  [{config.model.variant}] {epoch_line(metrics)}", flush=True),
    )
    return model


def run_demo(config: Config, *, data: str | None, labels_key: str | None, batch_key: str | None,
             n_top_genes: int | None, out: Path) -> dict:
    matrix = load_demo_data(data, labels_key=labels_key, batch_key=batch_key, n_top_genes=n_top_genes,
                            seed=config.experiment.seed)
    held_out = validation_mask(matrix.cell_names, config.data.validation_fraction)
    train, val = matrix.subset_cells(np.flatnonzero(~held_out)), matrix.subset_cells(np.flatnonzero(held_out))
    print(f"{train.n_cells} training and {val.n_cells} held-out cells, {matrix.n_genes} genes")

    report = {"config": config.to_dict(), "n_train": train.n_cells, "n_held_out": val.n_cells, "variants": {}}
    for variant in DEMO_VARIANTS:
        variant_config = config.replace(**{"model.variant": variant})
        print(f"training {variant} for {config.train.max_epochs} epochs")
        model = train_in_process(variant_config, train, val)
        report["variants"][variant] = [asdict(row) for row in depth_response(model, train, val,
                                                                             seed=config.experiment.seed)]

    print(format_depth_table(report["variants"]))
    out.mkdir(parents=True, exist_ok=True)
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
