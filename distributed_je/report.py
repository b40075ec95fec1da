"""``dje evaluate``: the paper's analyses of one trained model, streamed from the data in blocks.

Held-out cells (the model's validation split, by cell-name hash) are binomially thinned to a
grid of depths and embedded; cells of the training split at full depth are the kNN reference.
Per depth: label transfer (accuracy, balanced accuracy), how much of each cell's full-depth
neighbourhood survives, condition separation (AUC), distances to f(0) and to the origin, and
the reconstruction (NLL per gene, log2(mu/x) bias). Only latents and per-gene sums are kept;
counts are densified one block at a time.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from distributed_je.artifact import TrainedModel
from distributed_je.augment import binomial_thin
from distributed_je.distributions import log_likelihood
from distributed_je.metrics import balanced_accuracy, knn_predict, knn_vote_share, roc_auc
from distributed_je.module import neighbours_kept
from distributed_je.seeding import STREAM_EVALUATION, numpy_generator, torch_generator
from distributed_je.split import validation_mask

DEPTHS = (10, 20, 50, 100, 200, 500, 1000, 2000)  # UMIs
FRACTIONS = (0.5, 0.2, 0.1)                       # of each cell's own depth
RECONSTRUCTION_DEPTHS = ("full", "1000", "200", "50")
KNN_K = 15
MAX_REFERENCE_CELLS = 20_000
MAX_QUERY_CELLS = 5_000
BLOCK_ROWS = 4096
BIAS_POINT_NOTE = ("f(0), the embedding of an all-zero cell, is where low-count cells collapse when a model loses "
                   "their identity: watch the distance to f(0) shrink with depth.")


def depth_targets() -> list[tuple[str, float | None, bool]]:
    """(name, value, is_fraction) of every evaluated depth, shallowest absolute depth first."""
    return ([(str(d), float(d), False) for d in DEPTHS] + [(f"{f:.0%}", f, True) for f in FRACTIONS]
            + [("full", None, False)])


@dataclass
class _Collected:
    """What one pass over the data keeps: latents, labels and per-gene reconstruction sums."""

    reference_latent: list = field(default_factory=list)
    reference_labels: list = field(default_factory=list)
    reference_conditions: list = field(default_factory=list)
    query_latent: dict = field(default_factory=dict)   # depth name -> [arrays]
    query_depth: dict = field(default_factory=dict)    # depth name -> [UMIs after thinning]
    query_labels: list = field(default_factory=list)
    query_conditions: list = field(default_factory=list)
    query_batches: list = field(default_factory=list)
    gene_sums: dict = field(default_factory=dict)      # depth name -> {"nll", "mu", "x"} per gene


@dataclass(frozen=True)
class DepthRow:
    depth: str
    n_cells: int
    median_umis: float
    accuracy: float
    balanced_accuracy: float
    knn_kept: float                  # share of the full-depth 15 nearest neighbours kept
    distance_to_bias_point: float    # median
    distance_to_origin: float        # median
    condition_auc: float | None


def evaluate_model(model: TrainedModel, data, *, labels_key: str, condition_key: str | None = None,
                   out: Path, seed: int = 0) -> dict:
    """Write report.json, report.md and the plots to ``out``; return the report."""
    out.mkdir(parents=True, exist_ok=True)
    collected = _collect(model, data, labels_key=labels_key, condition_key=condition_key, seed=seed)
    if not collected.query_labels or not collected.reference_labels:
        raise ValueError(f"{data}: no labelled cells in the held-out or the reference split of {labels_key!r}")
    bias_points = np.stack([model.module.bias_point(b).cpu().numpy() for b in range(model.module.n_batches)])
    rows, latents = _depth_rows(collected, bias_points, condition_key is not None)
    report = {
        "data": str(data), "labels_key": labels_key, "condition_key": condition_key,
        "model": {"variant": model.config.model.variant, "epochs": model.state.epoch,
                  "n_latent": model.config.model.n_latent},
        "n_reference": len(np.concatenate(collected.reference_labels)),
        "n_held_out": len(np.concatenate(collected.query_labels)),
        "bias_point": bias_points[0].tolist(),
        "depth_response": [asdict(row) for row in rows],
        "reconstruction": _reconstruction(collected, model.gene_names),
    }
    (out / "report.json").write_text(json.dumps(report, indent=1))
    _plot(report, latents, collected, bias_points[0], out)
    (out / "report.md").write_text(format_report(report))
    return report


def _collect(model: TrainedModel, data, *, labels_key: str, condition_key: str | None, seed: int) -> _Collected:
    keys = (labels_key,) + ((condition_key,) if condition_key else ())
    n_cells = _n_cells(data)
    held_fraction = model.config.data.validation_fraction or 0.1
    keep_reference = min(1.0, MAX_REFERENCE_CELLS / max(1.0, n_cells * (1 - held_fraction)))
    keep_query = min(1.0, MAX_QUERY_CELLS / max(1.0, n_cells * held_fraction))
    rng = numpy_generator(seed, stream=STREAM_EVALUATION)
    generator = torch_generator(seed, stream=STREAM_EVALUATION)
    collected = _Collected()
    for block in model.cell_blocks(data, block_rows=BLOCK_ROWS, obs_keys=keys):
        labels = block.obs[labels_key]
        labelled = ~np.isin(labels, ("nan", "", "None"))
        held_out = validation_mask(block.cell_names, held_fraction)
        draw = rng.random(len(labels))
        reference = np.flatnonzero(labelled & ~held_out & (draw < keep_reference))
        query = np.flatnonzero(labelled & held_out & (draw < keep_query))
        if len(reference):
            collected.reference_latent.append(model.encode(block.counts[reference], block.batch_codes[reference]))
            collected.reference_labels.append(labels[reference])
            if condition_key:
                collected.reference_conditions.append(block.obs[condition_key][reference])
        if len(query):
            _collect_query(model, block, query, collected, generator)
            collected.query_labels.append(labels[query])
            collected.query_batches.append(block.batch_codes[query])
            if condition_key:
                collected.query_conditions.append(block.obs[condition_key][query])
    return collected


def _n_cells(data) -> int:
    if hasattr(data, "n_obs"):
        return data.n_obs
    if str(data).endswith(".h5ad"):
        import anndata

        adata = anndata.read_h5ad(data, backed="r")
        n = adata.n_obs
        adata.file.close()
        return n
    from distributed_je.store import open_store

    return open_store(str(data)).n_cells


@torch.no_grad()
def _collect_query(model: TrainedModel, block, rows: np.ndarray, collected: _Collected,
                   generator: torch.Generator) -> None:
    module = model.module
    counts = torch.as_tensor(block.counts[rows].toarray(), dtype=torch.float32)
    batch_index = torch.as_tensor(block.batch_codes[rows])
    one_hot = module._one_hot(batch_index, len(rows), counts.device)
    library = counts.sum(1)
    for name, value, is_fraction in depth_targets():
        if value is None:
            thinned = counts
        else:
            p = torch.full_like(library, value) if is_fraction else torch.clamp(value / library.clamp(min=1), max=1)
            thinned = binomial_thin(counts, p, generator=generator)
        latent = module.encode(thinned, batch_index)
        collected.query_latent.setdefault(name, []).append(latent.numpy())
        depth = thinned.sum(1, keepdim=True)
        collected.query_depth.setdefault(name, []).append(depth[:, 0].numpy())
        if name in RECONSTRUCTION_DEPTHS:
            mu, theta, zi_logits = module.decoder(latent, depth, batch_index, one_hot)
            nll = -log_likelihood(module.model_config.likelihood, thinned, mu, theta, zi_logits)
            sums = collected.gene_sums.setdefault(name, {"nll": 0.0, "mu": 0.0, "x": 0.0, "cells": 0})
            sums["nll"] = sums["nll"] + nll.sum(0).double().numpy()
            sums["mu"] = sums["mu"] + mu.sum(0).double().numpy()
            sums["x"] = sums["x"] + thinned.sum(0).double().numpy()
            sums["cells"] += len(rows)


def _depth_rows(collected: _Collected, bias_points: np.ndarray, with_condition: bool
                ) -> tuple[list[DepthRow], dict[str, np.ndarray]]:
    classes, reference_codes = np.unique(np.concatenate(collected.reference_labels), return_inverse=True)
    lookup = {c: i for i, c in enumerate(classes)}
    query_codes = np.array([lookup.get(c, -1) for c in np.concatenate(collected.query_labels)])
    reference = np.concatenate(collected.reference_latent)
    k = min(KNN_K, len(reference))
    own_bias_point = bias_points[np.concatenate(collected.query_batches)]
    latents = {name: np.concatenate(parts) for name, parts in collected.query_latent.items()}
    full = torch.as_tensor(latents["full"])
    conditions = None
    if with_condition:
        ref_conditions = np.concatenate(collected.reference_conditions)
        query_conditions = np.concatenate(collected.query_conditions)
        conditions = (ref_conditions, query_conditions)
    rows = []
    for name, _, _ in depth_targets():
        latent = latents[name]
        predicted = knn_predict(reference, reference_codes, latent, k=k)
        auc = None
        if conditions is not None:
            auc = condition_auc(reference, conditions[0], latent, conditions[1], k)
        rows.append(DepthRow(
            depth=name, n_cells=len(latent), median_umis=float(np.median(np.concatenate(collected.query_depth[name]))),
            accuracy=float((predicted == query_codes).mean()),
            balanced_accuracy=balanced_accuracy(query_codes, predicted),
            knn_kept=float(neighbours_kept(full, torch.as_tensor(latent), min(KNN_K, len(latent) - 1)))
            if len(latent) > 1 else float("nan"),
            distance_to_bias_point=float(np.median(np.linalg.norm(latent - own_bias_point, axis=1))),
            distance_to_origin=float(np.median(np.linalg.norm(latent, axis=1))),
            condition_auc=auc,
        ))
    return rows, latents


def condition_auc(reference: np.ndarray, reference_conditions: np.ndarray, query: np.ndarray,
                   query_conditions: np.ndarray, k: int) -> float:
    """AUC of a kNN classifier of the condition (macro one-vs-rest over more than two)."""
    classes, codes = np.unique(reference_conditions, return_inverse=True)
    shares = knn_vote_share(reference, codes, len(classes), query, k=k)
    positives = classes if len(classes) > 2 else classes[1:]
    aucs = [roc_auc(query_conditions == c, shares[:, list(classes).index(c)]) for c in positives]
    return float(np.nanmean(aucs))


def _reconstruction(collected: _Collected, gene_names: list[str]) -> list[dict]:
    rows = []
    for name in RECONSTRUCTION_DEPTHS:
        sums = collected.gene_sums[name]
        nll_per_gene = sums["nll"] / sums["cells"]
        bias = np.log2((sums["mu"] + 1e-8) / (sums["x"] + 1e-8))
        expressed = sums["x"] > 0
        rows.append({
            "depth": name, "nll_per_cell": float(nll_per_gene.sum()),
            "median_abs_log2_bias": float(np.median(np.abs(bias[expressed]))),
            "per_gene": {"gene": gene_names, "nll": nll_per_gene.tolist(), "log2_bias": bias.tolist(),
                         "mean_count": (sums["x"] / sums["cells"]).tolist()},
        })
    return rows


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """A Markdown table's lines: the header, its rule, one line per row of already formatted cells."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def format_report(report: dict) -> str:
    model = report["model"]
    condition = bool(report["condition_key"])
    data = (f"Data: `{report['data']}`; {report['n_held_out']:,} held-out cells thinned to each depth, "
            f"{report['n_reference']:,} training-split cells at full depth as the {KNN_K}-NN reference "
            f"(labels: `{report['labels_key']}`).")
    header = ["depth", "median UMIs", "accuracy", "balanced accuracy", "kNN kept", "dist. to f(0)",
              "dist. to origin"] + (["condition AUC"] if condition else [])
    depth_rows = [[row["depth"], f"{row['median_umis']:.0f}", f"{row['accuracy']:.3f}",
                   f"{row['balanced_accuracy']:.3f}", f"{row['knn_kept']:.3f}", f"{row['distance_to_bias_point']:.2f}",
                   f"{row['distance_to_origin']:.2f}"] + ([f"{row['condition_auc']:.3f}"] if condition else [])
                  for row in report["depth_response"]]
    reconstruction_rows = [[row["depth"], f"{row['nll_per_cell']:.1f}", f"{row['median_abs_log2_bias']:.3f}"]
                           for row in report["reconstruction"]]
    lines = [
        f"# Evaluation: {model['variant']} model ({model['epochs']} epochs, n_latent {model['n_latent']})", "",
        data, "", "## Depth response", "",
        *markdown_table(header, depth_rows),
        "", "![depth response](depth_response.png)", "", "## Bias point", "", BIAS_POINT_NOTE, "",
        "![bias point](bias_point.png)", "", "## Reconstruction", "",
        *markdown_table(["depth", "NLL per cell", "median abs log2(mu/x) over genes"], reconstruction_rows),
    ]
    lines += ["", "![reconstruction](reconstruction.png)", ""]
    return "\n".join(lines)


def _plot(report: dict, latents: dict[str, np.ndarray], collected: _Collected, bias_point: np.ndarray,
          out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    absolute = [r for r in report["depth_response"] if r["depth"].isdigit()]
    depths = [int(r["depth"]) for r in absolute]
    fig, axes = plt.subplots(1, 2 + bool(report["condition_key"]), figsize=(13, 4))
    for key, label in (("balanced_accuracy", "balanced accuracy"), ("accuracy", "accuracy")):
        axes[0].plot(depths, [r[key] for r in absolute], marker="o", label=label)
    axes[0].set(xscale="log", xlabel="UMIs per held-out cell", ylabel="kNN label transfer", ylim=(0, 1))
    axes[0].legend()
    axes[1].plot(depths, [r["knn_kept"] for r in absolute], marker="o")
    axes[1].set(xscale="log", xlabel="UMIs per held-out cell", ylabel="share of full-depth neighbours kept",
                ylim=(0, 1))
    if report["condition_key"]:
        axes[2].plot(depths, [r["condition_auc"] for r in absolute], marker="o")
        axes[2].set(xscale="log", xlabel="UMIs per held-out cell", ylabel=f"{report['condition_key']} AUC",
                    ylim=(0.4, 1))
    fig.tight_layout()
    fig.savefig(out / "depth_response.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].plot(depths, [r["distance_to_bias_point"] for r in absolute], marker="o", label="to f(0)")
    axes[0].plot(depths, [r["distance_to_origin"] for r in absolute], marker="o", label="to the origin")
    axes[0].set(xscale="log", xlabel="UMIs per held-out cell", ylabel="median distance")
    axes[0].legend()
    reference = np.concatenate(collected.reference_latent)
    centre = reference.mean(0)
    _, _, components = np.linalg.svd(reference - centre, full_matrices=False)
    project = lambda x: (np.atleast_2d(x) - centre) @ components[:2].T
    cmap = plt.get_cmap("viridis")
    for i, depth in enumerate(depths + ["full"]):
        points = project(latents[str(depth)][:1000])
        axes[1].scatter(points[:, 0], points[:, 1], s=3, color=cmap(i / len(depths)), label=str(depth))
    for point, marker, name in ((bias_point, "X", "f(0)"), (np.zeros_like(bias_point), "P", "origin")):
        x, y = project(point)[0]
        axes[1].scatter([x], [y], marker=marker, s=150, c="red" if name == "f(0)" else "black", label=name)
    axes[1].set(xlabel="PC 1", ylabel="PC 2", title="held-out latents by depth (UMIs)")
    axes[1].legend(markerscale=2, fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "bias_point.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    for row in report["reconstruction"]:
        mean = np.asarray(row["per_gene"]["mean_count"])
        bias = np.asarray(row["per_gene"]["log2_bias"])
        shown = mean > 0
        ax.scatter(mean[shown], bias[shown], s=3, label=f"depth {row['depth']}")
    ax.axhline(0, color="black", lw=0.5)
    ax.set(xscale="log", xlabel="mean count per cell", ylabel="log2(mu / x) per gene")
    ax.legend(markerscale=4)
    fig.tight_layout()
    fig.savefig(out / "reconstruction.png", dpi=100)
    plt.close(fig)
