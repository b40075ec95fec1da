"""Loader throughput: our store loader against backed h5ad, scdataset and an in-RAM CSR ceiling.

Stores of 100k and 1M cells are made with `dje synth` from pbmc3k (2,000 seurat_v3 genes),
kept under --work between runs. Every reader runs in its own process pinned to one core
(taskset), serves batches of 512 cells as dense float32 (ours also as CSR), and reports
steady-state cells/s (after a warm-up of 20 batches; the median of 5 windows in each of
--repeats processes, then the median over processes), peak RSS and how many distinct source blocks of 4,096 rows each batch mixes (the batch diversity).

    .venv/bin/python benchmarks/loader_throughput.py            (needs `make bench-env` for scdataset)
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
PBMC3K = REPO.parent / "shared" / "data" / "pbmc3k_labeled.h5ad"
BATCH, WARMUP, DIVERSITY_BLOCK = 512, 20, 4096


def peak_rss_mb() -> float:
    """VmHWM of this process: unlike ru_maxrss it is not inherited across exec from the forking parent."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(batches, n_cells: int, windows: int = 5) -> dict:
    """Cells/s over ``n_cells`` after a warm-up, as the median of ``windows`` equal windows (robust to
    a hiccup of this shared machine); distinct 4,096-row blocks per batch where rows are known."""
    iterator = iter(batches)
    for _ in range(WARMUP):
        next(iterator)
    diversity, rates = [], []
    for _ in range(windows):
        served, start = 0, time.perf_counter()
        while served < n_cells // windows:
            counts, rows = next(iterator)
            served += counts.shape[0]
            if rows is not None:
                diversity.append(len(np.unique(np.asarray(rows) // DIVERSITY_BLOCK)))
        rates.append(served / (time.perf_counter() - start))
    return {"cells_per_s": float(np.median(rates)), "peak_rss_mb": peak_rss_mb(),
            "diversity_min": min(diversity) if diversity else None,
            "diversity_mean": float(np.mean(diversity)) if diversity else None}


def ours(store: str, dense: bool, n_cells: int) -> dict:
    from distributed_je.keys import COUNTS, ROW
    from distributed_je.loader import StoreLoader
    from distributed_je.store import open_store

    loader = StoreLoader(open_store(store), batch_size=BATCH, split="all", shuffle=True, block_rows=4096,
                         blocks_per_buffer=32, dense=dense, with_rows=True)

    def batches():
        epoch = 0
        while True:
            for b in loader.epoch(epoch):
                yield b[COUNTS], b[ROW].numpy()
            epoch += 1
    return measure(batches(), n_cells)


def backed_h5ad(h5ad: str, n_cells: int) -> dict:
    import anndata

    adata = anndata.read_h5ad(h5ad, backed="r")
    rng = np.random.default_rng(0)

    def batches():
        while True:
            rows = np.sort(rng.choice(adata.n_obs, BATCH, replace=False))
            yield adata.X[rows].toarray().astype(np.float32), rows
    return measure(batches(), n_cells)


def scdataset_backed(h5ad: str, n_cells: int) -> dict:
    import anndata
    from scdataset import BlockShuffling, scDataset

    adata = anndata.read_h5ad(h5ad, backed="r")
    dataset = scDataset(adata, BlockShuffling(block_size=4), batch_size=BATCH, fetch_factor=16,
                        fetch_transform=lambda view: view.X.toarray().astype(np.float32), seed=0)

    def batches():
        while True:
            for counts in dataset:
                yield counts, None
    return measure(batches(), n_cells)


def in_ram_csr(h5ad: str, n_cells: int) -> dict:
    import anndata

    x = anndata.read_h5ad(h5ad).X.tocsr()
    x.indptr = x.indptr.astype(np.int32) if x.nnz < 2**31 else x.indptr
    x.indices = x.indices.astype(x.indptr.dtype)  # matching widths: scipy copies otherwise (100x slower)
    rng = np.random.default_rng(0)

    def batches():
        while True:
            rows = np.sort(rng.choice(x.shape[0], BATCH, replace=False))
            yield x[rows].toarray().astype(np.float32), rows
    return measure(batches(), n_cells)


def median_run(runs: list[dict]) -> dict:
    """The median cells/s of several runs, the highest peak RSS among them."""
    ordered = sorted(runs, key=lambda r: r["cells_per_s"])
    return {**ordered[len(ordered) // 2], "peak_rss_mb": max(r["peak_rss_mb"] for r in runs)}


READERS = {"ours_dense": lambda a: ours(a.store, True, a.n),
           "ours_csr": lambda a: ours(a.store, False, a.n),
           "backed_h5ad": lambda a: backed_h5ad(a.h5ad, a.n),
           "scdataset": lambda a: scdataset_backed(a.h5ad, a.n),
           "in_ram_csr": lambda a: in_ram_csr(a.h5ad, a.n)}
LABELS = {"ours_dense": "distributed_je StoreLoader, dense", "ours_csr": "distributed_je StoreLoader, CSR (what training uses)",
          "backed_h5ad": "anndata backed h5ad, random batches", "scdataset": "scdataset 0.3 on backed h5ad (BlockShuffling 4, fetch 16)",
          "in_ram_csr": "in-RAM scipy CSR, random batches (ceiling)"}


def reference_store(work: Path) -> Path:
    """pbmc3k over its 2,000 most variable genes, converted once: the synthetic stores' source."""
    from distributed_je.convert import convert

    work.mkdir(parents=True, exist_ok=True)
    reference = work / "pbmc3k_2000.zarr"
    if not reference.exists():
        convert(PBMC3K, str(reference), n_top_genes=2000, labels_key="cell_type", progress=False)
    return reference


def prepare(work: Path, n_cells: int) -> tuple[str, str]:
    """A synthetic store of ``n_cells`` cells drawn from pbmc3k, and its h5ad copy."""
    from distributed_je.synth import synthesize

    reference = reference_store(work)
    store, h5ad = work / f"synth_{n_cells}.zarr", work / f"synth_{n_cells}.h5ad"
    if not store.exists():
        synthesize(str(reference), str(store), n_cells=n_cells, seed=0, progress=False)
    if not h5ad.exists():
        import anndata

        anndata.read_zarr(store).write_h5ad(h5ad)
    return str(store), str(h5ad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/dje_loader_bench"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--cells", type=int, default=2_000_000, help="cells served per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per reader; the table gives medians")
    parser.add_argument("--readers", nargs="+", default=list(READERS))
    parser.add_argument("--one", nargs=3, metavar=("READER", "STORE", "H5AD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # the child process: one reader, one core
        reader, args.store, args.h5ad = args.one
        args.n = args.cells
        print(json.dumps(READERS[reader](args)))
        return

    rows = []
    for size in args.sizes:
        store, h5ad = prepare(args.work, size)
        for reader in args.readers:
            n = args.cells if reader not in ("backed_h5ad", "scdataset") else args.cells // 20  # slow readers
            cmd = ["taskset", "-c", "0", sys.executable, __file__, "--cells", str(n), "--one", reader, store, h5ad]
            runs = []
            for _ in range(args.repeats):
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if out.returncode:
                    runs = [{"error": out.stderr.strip().splitlines()[-1]}]
                    break
                runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            rows.append((size, reader, runs[0] if "error" in runs[0] else median_run(runs)))
            print(f"  {size:>9,} {reader}: {[r.get('cells_per_s') for r in runs]}", file=sys.stderr, flush=True)

    print("\n| cells in store | reader | cells/s (1 core) | peak RSS (MB) | distinct 4,096-row blocks per batch (min / mean) |")
    print("|---|---|---|---|---|")
    for size, reader, r in rows:
        if "error" in r:
            print(f"| {size:,} | {LABELS[reader]} | failed: {r['error']} | | |")
            continue
        diversity = "n/a" if r["diversity_min"] is None else f"{r['diversity_min']} / {r['diversity_mean']:.1f}"
        print(f"| {size:,} | {LABELS[reader]} | {r['cells_per_s']:,.0f} | {r['peak_rss_mb']:,.0f} | {diversity} |")


if __name__ == "__main__":
    main()
