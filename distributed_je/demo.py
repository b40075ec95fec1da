"""The main job on the embedded default, from nothing: data -> zarr store -> a small Optuna
tune on local Ray -> the best configuration trained with Ray Train -> evaluated against the
``scvi`` variant trained the same way -> where the reports are.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distributed_je.artifact import load_model
from distributed_je.config import Config
from distributed_je.convert import convert
from distributed_je.report import evaluate_model
from distributed_je.synthetic import synthetic_counts
from distributed_je.training import run_training
from distributed_je.tuning import run_tune


def build_store(data: str | None, *, labels_key: str | None, batch_key: str | None, n_top_genes: int | None,
                out: Path, seed: int) -> dict:
    """Convert the demo's data (a generated dataset unless ``data`` names an h5ad) into ``out/store.zarr``;
    return the config values that point at it."""
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


def run_demo(config: Config, *, data: str | None, labels_key: str | None, batch_key: str | None,
             n_top_genes: int | None, out: Path, tune_epochs: int) -> dict:
    """``tune_epochs``: how long each tuning trial trains (the final models train ``train.max_epochs``)."""
    out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out / "runs", ignore_errors=True)  # the demo starts from nothing every time
    config = config.replace(**build_store(data, labels_key=labels_key, batch_key=batch_key,
                                          n_top_genes=n_top_genes, out=out, seed=config.experiment.seed),
                            **{"experiment.storage_path": str((out / "runs").resolve())})

    tune_config = config.replace(**{"experiment.name": "tune", "train.max_epochs": tune_epochs})
    print(f"tuning {', '.join(config.tune.search_space)}: {config.tune.num_samples} trials of {tune_epochs} epochs, "
          f"objective {config.tune.metric}", flush=True)
    outcome = run_tune(tune_config)
    best = config.replace(**outcome.best_params)
    print(f"best: {outcome.best_params}", flush=True)

    reports = {}
    for variant, variant_config in (("je", best), ("scvi", config)):
        name = f"{variant}-{'best' if variant == 'je' else 'baseline'}"
        print(f"training {name} for {config.train.max_epochs} epochs with Ray Train", flush=True)
        result = run_training(variant_config.replace(**{"model.variant": variant, "experiment.name": name}))
        reports[variant] = evaluate_model(load_model(result.checkpoint.path), config.data.store,
                                          labels_key=config.data.labels_key, out=out / variant,
                                          seed=config.experiment.seed)
    summary = {"best_params": outcome.best_params, "tune_results": str(outcome.report_dir),
               "reports": {variant: str(out / variant / "report.md") for variant in reports},
               "depth_response": {variant: report["depth_response"] for variant, report in reports.items()}}
    (out / "demo_report.json").write_text(json.dumps(summary, indent=2))
    print(format_depth_table(summary["depth_response"]))
    print(f"tuning results: {outcome.report_dir}/results.csv (and objective.png, params.png)")
    for variant, path in summary["reports"].items():
        print(f"{variant} report: {path}")
    return summary


def format_depth_table(variants: dict[str, list[dict]]) -> str:
    """Held-out balanced accuracy, kept neighbourhood and distance to f(0) by depth, per variant."""
    names = list(variants)
    header = "depth (UMIs) | " + " | ".join(f"{v} bal.acc | {v} kNN kept | {v} dist f(0)" for v in names)
    lines = [header, "-" * len(header)]
    for i, row in enumerate(variants[names[0]]):
        cells = " | ".join(f"{variants[v][i]['balanced_accuracy']:.3f} | {variants[v][i]['knn_kept']:.3f} | "
                           f"{variants[v][i]['distance_to_bias_point']:.2f}" for v in names)
        lines.append(f"{row['depth']:>12} | {cells}")
    return "\n".join(lines)
