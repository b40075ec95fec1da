"""Training throughput: steady-state cells/s (loader included) of our `scvi` and `je` variants
against scvi-tools 1.4.2 SCVI, same architecture (1 x 128, n_latent 10, NB) and data.

Data: pbmc3k (2,000 seurat_v3 genes) and a 1M-cell synthetic store made from it. Per batch
size, one process trains our `scvi` and `je` taking turns window by window (so their ratio
is measured under the same conditions) and another trains scvi-tools; each is pinned to one
core with 1 torch thread, takes WARM_STEPS optimizer steps, then WINDOWS timed windows of
steady steps. cells/s is that of the median window, so start-up (Lightning set-up, loader
warm-up) and one-off stalls drop out; the JE cost is the median over windows of je's time
over scvi's in the window next to it, so slow spells of a shared machine cancel. The two
processes alternate --rounds times; the table gives medians over rounds, and each round's
ratios beside them (two processes never share a slow spell, so ours against scvi-tools
needs several rounds). Peak RSS is VmHWM. Then Ray Train with 1 and 2 workers (1 CPU each)
for one epoch of a 100k-cell synthetic store.

    .venv/bin/python benchmarks/train_throughput.py          (needs `make bench-env`)
    .venv/bin/python benchmarks/train_throughput.py --data pbmc3k --batch-sizes 128 --rounds 7 --no-ray
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from loader_throughput import peak_rss_mb, prepare, reference_store  # noqa: E402  (same stores as the loader benchmark)

from distributed_je.store import open_store  # noqa: E402

WARM_STEPS = 10
WINDOWS = 11


def training_run(store, variant: str, batch_size: int) -> tuple:
    """A fresh ``variant`` on ``store`` (an open Store) as (model, optimizer, batches, state, config):
    the batches stream epoch after epoch without end."""
    import itertools

    from distributed_je.config import load_config
    from distributed_je.loader import StoreLoader
    from distributed_je.loop import TrainState, build_model, build_optimizer

    config = load_config(None, [f"model.variant={variant}", f"data.batch_size={batch_size}"])
    loader = StoreLoader.from_config(store, config.data, split="all", seed=0)
    model = build_model(config, store.n_genes, 1)
    batches = itertools.chain.from_iterable(loader.epoch(epoch) for epoch in itertools.count())
    return model, build_optimizer(model, config.optim), batches, TrainState(), config


def ours(store: str, variants: list[str], batch_size: int, steps: int) -> dict:
    """Seconds of each of WINDOWS windows of ``steps`` steps per variant, after WARM_STEPS steps.
    The variants take turns window by window in this one process, so their ratio is measured
    under the same conditions."""
    import itertools

    import torch

    from distributed_je.loop import train_epoch

    torch.set_num_threads(1)
    s = open_store(store)
    runs = {variant: training_run(s, variant, batch_size) for variant in variants}

    seconds = {variant: [] for variant in variants}
    for n_steps in [WARM_STEPS] + [steps] * WINDOWS:
        for variant, (model, optimizer, stream, state, config) in runs.items():
            start = time.perf_counter()
            train_epoch(model, optimizer, itertools.islice(stream, n_steps), state=state, config=config)
            seconds[variant].append(time.perf_counter() - start)
    return {"window_seconds": {variant: times[1:] for variant, times in seconds.items()}, "peak_rss_mb": peak_rss_mb()}


def scvi_tools(h5ad: str, batch_size: int, steps: int) -> dict:
    import anndata
    import lightning
    import scvi
    import torch

    class StepEnds(lightning.Callback):
        def __init__(self) -> None:
            self.times = [time.perf_counter()]

        def on_train_batch_end(self, *args, **kwargs) -> None:
            self.times.append(time.perf_counter())

    torch.set_num_threads(1)
    scvi.settings.seed = 0
    scvi.settings.dl_num_workers = 0
    adata = anndata.read_h5ad(h5ad)
    scvi.model.SCVI.setup_anndata(adata)
    model = scvi.model.SCVI(adata, n_hidden=128, n_latent=10, n_layers=1, gene_likelihood="nb")
    step_ends = StepEnds()
    model.train(max_epochs=10**6, max_steps=WARM_STEPS + WINDOWS * steps, batch_size=batch_size, train_size=1.0,
                accelerator="cpu",
                devices=1, enable_progress_bar=False, early_stopping=False, enable_checkpointing=False,
                logger=False, plan_kwargs={"n_epochs_kl_warmup": None, "n_steps_kl_warmup": 2000},
                callbacks=[step_ends])
    ends = step_ends.times[WARM_STEPS::steps]  # after the warm-up, then after each window
    return {"window_seconds": np.diff(ends).tolist(), "peak_rss_mb": peak_rss_mb()}


def ray_workers(store: str, workers: int, tmp: str) -> dict:
    import ray

    from distributed_je.config import load_config
    from distributed_je.training import run_training

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    config = load_config(None, [f"data.store={store}", f"scaling.num_workers={workers}", "train.max_epochs=1",
                                f"data.batch_size={512 // workers}", f"experiment.storage_path={tmp}",
                                f"experiment.name=ray{workers}", "data.validation_fraction=0.0"])
    result = run_training(config)
    return {"cells_per_s": result.metrics["cells_per_second"]}


def child(argv: list[str]) -> dict:
    cmd = ["taskset", "-c", "0" if argv[0] != "ray" else "0,1", sys.executable, __file__, "--one", json.dumps(argv)]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def cells_per_s(window_seconds: list[float], steps: int, batch_size: int, n_cells: int) -> float:
    """Of the median window; a batch holds at most the data's ``n_cells``."""
    return steps * min(batch_size, n_cells) / float(np.median(window_seconds))


def measure(store: str, h5ad: str, batch_size: int, steps: int, n_cells: int, rounds: int) -> dict:
    """cells/s and peak RSS of our scvi and je (one process, taking turns) and scvi-tools (another),
    ``rounds`` times in alternation. A ratio is the median over rounds of that round's ratio, so
    a slow spell of a shared machine that hits one process only moves one round."""
    per_round = []
    for _ in range(rounds):
        ours_run = child(["ours", store, str(batch_size), str(steps)])
        tools_run = child(["scvi-tools", h5ad, str(batch_size), str(steps)])
        windows = ours_run["window_seconds"]
        cells = {variant: cells_per_s(times, steps, batch_size, n_cells) for variant, times in windows.items()}
        cells["scvi-tools"] = cells_per_s(tools_run["window_seconds"], steps, batch_size, n_cells)
        per_round.append({
            "cells_per_s": cells,
            "scvi_vs_tools": cells["scvi"] / cells["scvi-tools"],
            "je_cost": float(np.median(np.array(windows["je"]) / np.array(windows["scvi"]))),
            "peak_rss_mb": {"ours": ours_run["peak_rss_mb"], "scvi-tools": tools_run["peak_rss_mb"]},
        })

    def median(get) -> float:
        return float(np.median([get(r) for r in per_round]))

    return {
        "cells_per_s": {name: median(lambda r: r["cells_per_s"][name]) for name in ("scvi", "je", "scvi-tools")},
        "scvi_vs_tools": median(lambda r: r["scvi_vs_tools"]),
        "scvi_vs_tools_rounds": [r["scvi_vs_tools"] for r in per_round],
        "je_cost": median(lambda r: r["je_cost"]),
        "je_cost_rounds": [r["je_cost"] for r in per_round],
        "peak_rss_mb": {name: max(r["peak_rss_mb"][name] for r in per_round) for name in ("ours", "scvi-tools")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dje_loader_bench"))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 512, 4096])
    parser.add_argument("--steps", type=int, default=20,
                        help="steps per timed window at batch 128 (scaled for larger batches, at least 8)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="our process and scvi-tools' alternate this many times per row; ratios are medians")
    parser.add_argument("--data", nargs="+", choices=["pbmc3k", "synthetic"], default=["pbmc3k", "synthetic"])
    parser.add_argument("--no-ray", dest="ray", action="store_false", help="skip the Ray Train workers table")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        argv = json.loads(args.one)
        if argv[0] == "ours":
            print(json.dumps(ours(argv[1], ["scvi", "je"], int(argv[2]), int(argv[3]))))
        elif argv[0] == "scvi-tools":
            print(json.dumps(scvi_tools(argv[1], int(argv[2]), int(argv[3]))))
        else:
            print(json.dumps(ray_workers(argv[1], int(argv[2]), argv[3])))
        return

    pbmc_store, pbmc_h5ad = str(reference_store(args.work)), str(args.work / "pbmc3k_2000.h5ad")
    datasets = {"pbmc3k": ("pbmc3k", pbmc_store, pbmc_h5ad)}
    if "synthetic" in args.data:
        datasets["synthetic"] = ("synthetic 1M", *prepare(args.work, 1_000_000))
    if not Path(pbmc_h5ad).exists():
        import anndata

        anndata.read_zarr(pbmc_store).write_h5ad(pbmc_h5ad)

    rows = []
    for key in args.data:
        name, store, h5ad = datasets[key]
        n_cells = open_store(store).n_cells
        for batch_size in args.batch_sizes:
            steps = max(8, args.steps * 128 // batch_size)
            result = measure(store, h5ad, batch_size, steps, n_cells, args.rounds)
            rows.append((name, batch_size, result))
            print(f"  {name} batch {batch_size}: {json.dumps(result)}", file=sys.stderr, flush=True)

    print(f"\nmedians over {args.rounds} rounds (our process, then scvi-tools'); per-round ratios in brackets")
    print("\n| data | batch | ours scvi cells/s | ours je cells/s | scvi-tools SCVI cells/s | scvi / scvi-tools | je cost per cell vs scvi | peak RSS MB (ours, both variants / scvi-tools) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batch_size, r in rows:
        s, j, t = (r["cells_per_s"][k] for k in ("scvi", "je", "scvi-tools"))
        rss = " / ".join(f"{r['peak_rss_mb'][k]:.0f}" for k in ("ours", "scvi-tools"))
        print(f"| {name} | {batch_size} | {s:,.0f} | {j:,.0f} | {t:,.0f} | {r['scvi_vs_tools']:.2f}x "
              f"({rounded(r['scvi_vs_tools_rounds'])}) | {r['je_cost']:.2f}x ({rounded(r['je_cost_rounds'])}) | {rss} |")
    if not args.ray:
        return

    import tempfile

    ray_store, _ = prepare(args.work, 100_000)
    with tempfile.TemporaryDirectory() as tmp:
        ray_rows = {w: child(["ray", ray_store, str(w), tmp])["cells_per_s"] for w in (1, 2)}
    print("\n| Ray Train workers (1 CPU each, global batch 512, synthetic 100k, one epoch) | cells/s | vs 1 worker |")
    print("|---|---|---|")
    for w, c in ray_rows.items():
        print(f"| {w} | {c:,.0f} | {c / ray_rows[1]:.2f}x |")


def rounded(ratios: list[float]) -> str:
    return ", ".join(f"{ratio:.2f}" for ratio in ratios)


if __name__ == "__main__":
    main()
