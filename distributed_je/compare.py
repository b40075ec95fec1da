"""``dje compare``: the variants side by side, with the reference tutorial's protocol.

Every variant trains on the same store, split and seeds through the same Ray training path
(``run_training``); a run that already finished is reused, so an interrupted comparison
continues where it stopped. The protocol: on depth-diversified data (``--diversify-depth``),
a 15-NN classifier fit on the latents of cells with at least 1,000 UMIs predicts the cells
below 1,000 UMIs, overall and by depth bin, as mean and spread over seeds. A KL-weight sweep
shows where low-depth cells sit: near the origin (the prior) or near f(0).
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from distributed_je.artifact import TrainedModel, load_model
from distributed_je.config import VARIANTS, Config
from distributed_je.metrics import balanced_accuracy, knn_predict
from distributed_je.report import condition_auc, markdown_table
from distributed_je.store import LIBRARY_SIZE, TOTAL_COUNTS, open_store
from distributed_je.synth import diversify_depth
from distributed_je.training import run_training

REFERENCE_MIN_UMIS = 1000
DEPTH_BINS = (20, 50, 100, 200, 500, 1000)
KNN_K = 15
KL_FACTORS = (0.1, 1.0, 10.0, 100.0)
KL_SWEEP_VARIANTS = ("scvi", "je")


@dataclass(frozen=True)
class ProtocolScores:
    accuracy: float            # cells below 1,000 UMIs
    balanced_accuracy: float
    by_bin: dict               # "[lo, hi)" -> {"n", "accuracy", "balanced_accuracy"}
    distance_to_bias_point: float  # median over the cells below 1,000 UMIs
    distance_to_origin: float
    condition_auc: float | None
    n_reference: int
    n_query: int


def cell_umis(store) -> np.ndarray:
    """Each cell's UMIs over all of its source's genes (the store's own genes for older stores)."""
    return store.obs_values(TOTAL_COUNTS if TOTAL_COUNTS in store.obs_columns else LIBRARY_SIZE)


def protocol_scores(model: TrainedModel, store_path: str, *, labels_key: str,
                    condition_key: str | None = None) -> ProtocolScores:
    """The tutorial's low-depth label transfer on every cell of a store."""
    store = open_store(store_path)
    umis = cell_umis(store)
    keys = (labels_key,) + ((condition_key,) if condition_key else ())
    latent, labels, conditions = [], [], []
    for block in model.cell_blocks(store_path, obs_keys=keys):
        latent.append(model.encode(block.counts, block.batch_codes))
        labels.append(block.obs[labels_key])
        if condition_key:
            conditions.append(block.obs[condition_key])
    latent, labels = np.concatenate(latent), np.concatenate(labels)
    labelled = ~np.isin(labels, ("nan", "", "None"))
    reference = labelled & (umis >= REFERENCE_MIN_UMIS)
    query = labelled & (umis < REFERENCE_MIN_UMIS)
    if reference.sum() < KNN_K or not query.any():
        raise ValueError(f"{store_path}: {reference.sum()} labelled cells with >= {REFERENCE_MIN_UMIS} UMIs and "
                         f"{query.sum()} below: the protocol needs {KNN_K}+ and 1+ (diversify a deeper dataset)")
    predicted = knn_predict(latent[reference], labels[reference], latent, k=KNN_K)
    right = predicted == labels
    by_bin = {}
    for low, high in itertools.pairwise(DEPTH_BINS):
        cells = query & (umis >= low) & (umis < high)
        if cells.any():
            by_bin[f"[{low}, {high})"] = {"n": int(cells.sum()), "accuracy": float(right[cells].mean()),
                                          "balanced_accuracy": balanced_accuracy(labels[cells], predicted[cells])}
    bias_point = model.bias_point()
    auc = None
    if condition_key:
        conditions = np.concatenate(conditions)
        auc = condition_auc(latent[reference], conditions[reference], latent[query], conditions[query], KNN_K)
    return ProtocolScores(
        accuracy=float(right[query].mean()),
        balanced_accuracy=balanced_accuracy(labels[query], predicted[query]),
        by_bin=by_bin,
        distance_to_bias_point=float(np.median(np.linalg.norm(latent[query] - bias_point, axis=1))),
        distance_to_origin=float(np.median(np.linalg.norm(latent[query], axis=1))),
        condition_auc=auc, n_reference=int(reference.sum()), n_query=int(query.sum()),
    )


def _train_and_score(config: Config, *, labels_key: str, condition_key: str | None, address: str | None) -> dict:
    result = run_training(config, address=address)
    model = load_model(result.checkpoint.path)
    scores = protocol_scores(model, config.data.store, labels_key=labels_key, condition_key=condition_key)
    return {"variant": config.model.variant, "seed": config.experiment.seed, "kl_weight": config.loss.kl_weight,
            "epochs": int(result.metrics["epoch"]), "val_recon_nll": float(result.metrics["val_recon_nll"]),
            "checkpoint": result.checkpoint.path, **asdict(scores)}


def run_compare(config: Config, *, variants: list[str], out: Path, diversify: bool = False,
                seeds: tuple[int, ...] = (0, 1, 2), kl_factors: tuple[float, ...] = KL_FACTORS,
                labels_key: str | None = None, condition_key: str | None = None,
                address: str | None = None) -> dict:
    """Train every (variant, seed), score them, sweep the KL weight; write compare.{json,md,png}."""
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not variants:
        raise ValueError(f"--variants {','.join(variants)!r}: choose among {', '.join(VARIANTS)}")
    labels_key = labels_key or config.data.labels_key
    if not labels_key:
        raise ValueError("compare needs labels: set data.labels_key or pass --labels-key")
    if not config.data.store:
        raise ValueError("data.store is empty: give the zarr store to compare on (dje convert makes one)")
    out.mkdir(parents=True, exist_ok=True)
    config = config.replace(**{"experiment.storage_path": str((out / "runs").resolve())})
    if diversify:
        diversified = str(out / "diversified.zarr")
        n_cells = diversify_depth(config.data.store, diversified, seed=config.experiment.seed, overwrite=True)
        print(f"depth-diversified store: {diversified} ({n_cells:,} cells)", flush=True)
        config = config.replace(**{"data.store": diversified})

    def run(variant: str, seed: int, kl_factor: float = 1.0) -> dict:
        name = f"{config.experiment.name}-{variant}-seed{seed}" + (f"-kl{kl_factor:g}x" if kl_factor != 1 else "")
        run_config = config.replace(**{"model.variant": variant, "experiment.seed": seed, "experiment.name": name,
                                       "loss.kl_weight": config.loss.kl_weight * kl_factor})
        print(f"training {name}", flush=True)
        return {**_train_and_score(run_config, labels_key=labels_key, condition_key=condition_key,
                                   address=address), "kl_factor": kl_factor}

    runs = [run(variant, seed) for seed in seeds for variant in variants]
    sweep = [next((r for r in runs if r["variant"] == v and r["seed"] == seeds[0]), None) if factor == 1
             else run(v, seeds[0], factor)
             for v in KL_SWEEP_VARIANTS if v in variants for factor in kl_factors]
    report = {"store": config.data.store, "labels_key": labels_key, "condition_key": condition_key,
              "epochs": config.train.max_epochs, "seeds": list(seeds), "runs": runs, "kl_sweep": sweep,
              "summary": summarize(runs, variants)}
    report["claims"] = check_claims(report["summary"])
    (out / "compare.json").write_text(json.dumps(report, indent=1))
    (out / "compare.md").write_text(format_compare(report))
    _plot(report, out)
    return report


def summarize(runs: list[dict], variants: list[str]) -> dict:
    """Mean and standard deviation over seeds of each variant's scores."""
    summary = {}
    for variant in variants:
        chosen = [r for r in runs if r["variant"] == variant]
        entry = {}
        for key in ("balanced_accuracy", "accuracy", "val_recon_nll", "distance_to_bias_point",
                    "distance_to_origin", "condition_auc"):
            values = [r[key] for r in chosen if r[key] is not None]
            if values:
                entry[key] = (float(np.mean(values)), float(np.std(values)))
        entry["by_bin"] = {
            b: (float(np.mean([r["by_bin"][b]["balanced_accuracy"] for r in chosen if b in r["by_bin"]])),
                float(np.std([r["by_bin"][b]["balanced_accuracy"] for r in chosen if b in r["by_bin"]])))
            for b in chosen[0]["by_bin"]}
        summary[variant] = entry
    return summary


def check_claims(summary: dict) -> list[dict]:
    """The paper's four claims, each with the numbers behind it (when its variants were run)."""
    def mean(variant, key):
        return summary[variant][key][0]

    claims = []
    if {"je", "scvi"} <= set(summary):
        gap = mean("je", "balanced_accuracy") - mean("scvi", "balanced_accuracy")
        claims.append({"claim": "je beats scvi at low depth (by >= 0.03 balanced accuracy)", "holds": gap >= 0.03,
                       "evidence": f"je - scvi = {gap:+.3f}"})
        change = mean("je", "val_recon_nll") / mean("scvi", "val_recon_nll") - 1
        claims.append({"claim": "reconstruction stays about the same (within 2%)", "holds": abs(change) <= 0.02,
                       "evidence": f"held-out NLL je vs scvi: {change:+.2%}"})
    if {"thinning_only", "scvi"} <= set(summary):
        gap = mean("thinning_only", "balanced_accuracy") - mean("scvi", "balanced_accuracy")
        claims.append({"claim": "thinning_only does not beat scvi", "holds": gap < 0.03,
                       "evidence": f"thinning_only - scvi = {gap:+.3f}"})
    if {"je_only", "je"} <= set(summary):
        change = mean("je_only", "val_recon_nll") / mean("je", "val_recon_nll") - 1
        gap = mean("je_only", "balanced_accuracy") - mean("je", "balanced_accuracy")
        claims.append({"claim": "je_only fails (no reconstruction)", "holds": change > 0.1 or gap < -0.03,
                       "evidence": f"held-out NLL je_only vs je: {change:+.1%}; balanced accuracy {gap:+.3f}"})
    return claims


def _pm(pair) -> str:
    return f"{pair[0]:.3f} ± {pair[1]:.3f}"


def format_compare(report: dict) -> str:
    summary = report["summary"]
    variants = list(summary)
    with_auc = report["condition_key"] is not None
    protocol = (f"{report['epochs']} epochs, seeds {report['seeds']}; a {KNN_K}-NN classifier fit on cells with "
                f">= {REFERENCE_MIN_UMIS} UMIs predicts `{report['labels_key']}` of the cells below (mean ± sd).")
    header = ["variant", "balanced accuracy", "accuracy", "held-out recon NLL", "dist. to f(0)",
              "dist. to origin"] + (["condition AUC"] if with_auc else [])
    variant_rows = [[v, _pm(s["balanced_accuracy"]), _pm(s["accuracy"]),
                     f"{s['val_recon_nll'][0]:.1f} ± {s['val_recon_nll'][1]:.1f}",
                     f"{s['distance_to_bias_point'][0]:.2f}", f"{s['distance_to_origin'][0]:.2f}"]
                    + ([_pm(s["condition_auc"])] if with_auc else []) for v, s in summary.items()]
    lines = [f"# Variants compared on `{report['store']}`", "", protocol, "", *markdown_table(header, variant_rows)]
    if "thinning_only" in summary:
        lines += ["", "thinning_only trains and validates on thinned copies: its held-out NLL is on those copies "
                  "and does not compare with the others'."]
    bins = list(summary[variants[0]]["by_bin"])
    bin_rows = [[v] + [_pm(summary[v]["by_bin"][b]) if b in summary[v]["by_bin"] else "-" for b in bins]
                for v in variants]
    claim_rows = [[c["claim"], "yes" if c["holds"] else "NO", c["evidence"]] for c in report["claims"]]
    lines += ["", "Balanced accuracy by depth bin (UMIs):", "", *markdown_table(["variant", *bins], bin_rows),
              "", "## The paper's claims", "", *markdown_table(["claim", "holds", "evidence"], claim_rows)]
    if report["kl_sweep"]:
        sweep_rows = [[r["variant"], f"{r['kl_weight']:g} ({r['kl_factor']:g}x)", f"{r['balanced_accuracy']:.3f}",
                       f"{r['distance_to_origin']:.2f}", f"{r['distance_to_bias_point']:.2f}"]
                      for r in report["kl_sweep"]]
        lines += ["", "## KL-weight sweep (first seed): where the cells below 1,000 UMIs sit", "",
                  *markdown_table(["variant", "KL weight", "balanced accuracy", "dist. to origin", "dist. to f(0)"],
                                  sweep_rows)]
    lines += ["", "![variants](compare.png)", ""]
    return "\n".join(lines)


def _plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for variant, s in report["summary"].items():
        bins = list(s["by_bin"])
        means = [s["by_bin"][b][0] for b in bins]
        spread = [s["by_bin"][b][1] for b in bins]
        axes[0].errorbar(range(len(bins)), means, yerr=spread, marker="o", capsize=3, label=variant)
        axes[0].set_xticks(range(len(bins)), bins)
    axes[0].set(xlabel="UMIs per cell", ylabel="balanced accuracy (mean ± sd over seeds)", ylim=(0, 1))
    axes[0].legend()
    for variant in KL_SWEEP_VARIANTS:
        points = [r for r in report["kl_sweep"] if r["variant"] == variant]
        if points:
            axes[1].plot([r["distance_to_origin"] for r in points], [r["distance_to_bias_point"] for r in points],
                         marker="o", label=variant)
            for r in points:
                axes[1].annotate(f"{r['kl_factor']:g}x", (r["distance_to_origin"], r["distance_to_bias_point"]))
    axes[1].set(xlabel="median distance to the origin", ylabel="median distance to f(0)",
                title="cells below 1,000 UMIs, by KL weight")
    if report["kl_sweep"]:
        axes[1].legend()
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=100)
    plt.close(fig)
