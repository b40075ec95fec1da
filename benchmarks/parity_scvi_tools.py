"""Parity with scvi-tools: our `scvi` variant against scvi-tools 1.4.2 SCVI, same everything.

Same cells (pbmc3k, 2,000 seurat_v3 genes), same 90/10 split (by cell-name hash), same
architecture (1 x 128 hidden, n_latent 10, dropout 0.1, NB, per-gene dispersion), same
optimiser (Adam lr 1e-3, wd 1e-6, eps 0.01), batch 128, the same step-based KL warm-up and
the same epochs and seed. Held-out metrics are each tool's own one-posterior-sample
estimates, averaged over held-out cells. Prints one table.

    .venv/bin/python benchmarks/parity_scvi_tools.py --epochs 100 --seeds 0 1 2
(needs the bench extra: `make bench-env`)
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from distributed_je.config import load_config
from distributed_je.counts import CountMatrix, minibatches, read_h5ad
from distributed_je.loop import build_model, build_optimizer, evaluate, fit
from distributed_je.seeding import numpy_generator
from distributed_je.split import validation_mask

PBMC3K = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "pbmc3k_labeled.h5ad"
BATCH_SIZE = 128
KL_WARMUP_STEPS = 2000


def run_ours(train: CountMatrix, val: CountMatrix, *, epochs: int, seed: int) -> dict[str, float]:
    config = load_config(None, [
        "model.variant=scvi", f"experiment.seed={seed}", f"train.max_epochs={epochs}",
        f"data.batch_size={BATCH_SIZE}", f"loss.kl_warmup_steps={KL_WARMUP_STEPS}",
    ])
    model = build_model(config, train.n_genes, 1)
    optimizer = build_optimizer(model, config.optim)
    state = fit(
        model, optimizer, config=config,
        train_batches=lambda e: minibatches(train, batch_size=BATCH_SIZE, rng=numpy_generator(seed, 0, e),
                                            drop_last=True),
        val_batches=lambda: iter(()),
    )
    held_out = evaluate(model, minibatches(val, batch_size=1024), config=config)
    seconds = statistics.median(m["train_seconds"] for m in state.history)
    return {"recon_nll": held_out["val_recon_nll"], "elbo": held_out["val_elbo"], "s_per_epoch": seconds}


def run_scvi_tools(train: CountMatrix, val: CountMatrix, *, epochs: int, seed: int) -> dict[str, float]:
    import anndata
    import scvi

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0

    def adata(m: CountMatrix) -> anndata.AnnData:
        return anndata.AnnData(X=m.counts.copy(), obs={"cell": m.cell_names}, var={"gene": m.gene_names})

    train_adata, val_adata = adata(train), adata(val)
    scvi.model.SCVI.setup_anndata(train_adata)
    model = scvi.model.SCVI(train_adata, n_hidden=128, n_latent=10, n_layers=1, dropout_rate=0.1,
                            gene_likelihood="nb", dispersion="gene")
    start = time.perf_counter()
    model.train(
        max_epochs=epochs, batch_size=BATCH_SIZE, train_size=1.0, accelerator="cpu", devices=1,
        early_stopping=False, enable_progress_bar=False,
        plan_kwargs={"lr": 1e-3, "weight_decay": 1e-6, "eps": 0.01,
                     "n_epochs_kl_warmup": None, "n_steps_kl_warmup": KL_WARMUP_STEPS},
    )
    seconds = (time.perf_counter() - start) / epochs
    recon = model.get_reconstruction_error(val_adata, batch_size=1024)["reconstruction_loss"]
    elbo = model.get_elbo(val_adata, batch_size=1024)  # scvi-tools returns the ELBO itself; we print -ELBO
    return {"recon_nll": float(recon), "elbo": -float(elbo), "s_per_epoch": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=PBMC3K)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()

    matrix = read_h5ad(args.data, n_top_genes=2000)
    held_out = validation_mask(matrix.cell_names, 0.1)
    train, val = matrix.subset_cells(np.flatnonzero(~held_out)), matrix.subset_cells(np.flatnonzero(held_out))
    print(f"{args.data.name}: {train.n_cells} train / {val.n_cells} held-out cells, {matrix.n_genes} genes, "
          f"{args.epochs} epochs, batch {BATCH_SIZE}, torch threads {torch.get_num_threads()}")

    rows = []
    for seed in args.seeds:
        for name, run in (("distributed_je scvi", run_ours), ("scvi-tools 1.4.2 SCVI", run_scvi_tools)):
            result = run(train, val, epochs=args.epochs, seed=seed)
            rows.append((name, seed, result))
            print(f"  done: {name} seed {seed}: {result}", flush=True)

    print()
    print("| model | seed | held-out recon NLL | held-out -ELBO | s/epoch (median) |")
    print("|---|---|---|---|---|")
    for name, seed, r in rows:
        print(f"| {name} | {seed} | {r['recon_nll']:.2f} | {r['elbo']:.2f} | {r['s_per_epoch']:.3f} |")
    ours = [r["recon_nll"] for n, _, r in rows if n.startswith("distributed_je")]
    peer = [r["recon_nll"] for n, _, r in rows if n.startswith("scvi-tools")]
    gap = (statistics.mean(ours) - statistics.mean(peer)) / statistics.mean(peer)
    speed = statistics.median(r["s_per_epoch"] for n, _, r in rows if n.startswith("scvi-tools")) / statistics.median(
        r["s_per_epoch"] for n, _, r in rows if n.startswith("distributed_je"))
    print(f"\nrecon NLL, ours vs scvi-tools (mean over seeds): {100 * gap:+.2f}% (target: within 2%)")
    print(f"time per epoch, scvi-tools / ours (median): {speed:.2f}x")


if __name__ == "__main__":
    main()
