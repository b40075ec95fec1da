"""``dje``: the command line. Every subcommand's arguments are declared here; heavy imports
(torch, Ray) happen inside the handlers, so ``dje --help`` is instant."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

EXIT_BAD_INPUT = 2


def _add_config_args(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    parser.add_argument("config", nargs=None if required else "?", type=Path,
                        help="YAML config (see tune_configs/base.yaml for every key and its default)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value, e.g. --set loss.kl_weight=0.5 (repeatable)")


def _add_address_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="Ray cluster address to join (default: $RAY_ADDRESS, else start Ray on this machine)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dje", description="Distributed joint-embedding SCVI: stores, training, tuning, evaluation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("convert", help="convert h5ad / 10x h5 / 10x mtx counts to a zarr store")
    p.add_argument("src", help="source: .h5ad, 10x .h5 (Cell Ranger v3) or a 10x mtx directory")
    p.add_argument("dest", help="destination zarr store (path or fsspec URL)")
    p.add_argument("--layer", default=None, help="h5ad layer holding raw counts (default: X)")
    p.add_argument("--n-top-genes", type=int, default=None, help="keep the N most variable genes (seurat_v3)")
    p.add_argument("--genes", type=Path, default=None, help="file with one gene name per line to keep, in order")
    p.add_argument("--batch-key", default=None, help="obs column holding the batch")
    p.add_argument("--labels-key", default=None, help="obs column holding labels")
    p.add_argument("--keep-empty", action="store_true", help="keep cells with zero counts (dropped by default)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    p = sub.add_parser("synth", help="make an atlas-scale synthetic store from a reference store's real cells")
    p.add_argument("ref", help="reference zarr store")
    p.add_argument("dest", help="destination zarr store")
    p.add_argument("--cells", type=int, required=True, help="number of cells to generate")
    p.add_argument("--n-batches", type=int, default=1, help="synthetic batches with gene-wise scaling")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")

    p = sub.add_parser("train", help="train a JE-SCVI model with Ray Train")
    _add_config_args(p)
    _add_address_arg(p)

    p = sub.add_parser("tune", help="search hyperparameters with Ray Tune + Optuna")
    _add_config_args(p)
    _add_address_arg(p)
    p.add_argument("--resume", action="store_true", help="continue an interrupted experiment")

    p = sub.add_parser("embed", help="write a trained model's latent to obsm['X_je_scvi']")
    p.add_argument("model", help="checkpoint directory (local or remote)")
    p.add_argument("data", help="AnnData h5ad or zarr store to embed")
    p.add_argument("out", help="output .h5ad")

    p = sub.add_parser("evaluate", help="depth response, bias point and reconstruction report")
    p.add_argument("model", help="checkpoint directory")
    p.add_argument("data", help="h5ad or zarr store with held-out cells")
    p.add_argument("--labels-key", required=True, help="obs column with labels for kNN transfer")
    p.add_argument("--condition-key", default=None, help="obs column with a condition to separate")
    p.add_argument("--out", type=Path, required=True, help="report directory")

    p = sub.add_parser("compare", help="train and evaluate variants side by side")
    _add_config_args(p)
    _add_address_arg(p)
    p.add_argument("--variants", default="scvi,thinning_only,je,je_only", help="comma-separated variants")
    p.add_argument("--diversify-depth", action="store_true",
                   help="first thin each cell by min(1, 10^N(-1, 1)) and drop cells below 20 UMIs (the protocol)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds, one run per variant and seed")
    p.add_argument("--kl-factors", default="0.1,1,10,100",
                   help="KL-weight multipliers swept for scvi and je on the first seed ('' to skip)")
    p.add_argument("--labels-key", default=None, help="obs column with labels (default: data.labels_key)")
    p.add_argument("--condition-key", default=None, help="obs column with a condition to separate")
    p.add_argument("--out", type=Path, default=Path("dje_compare"), help="where runs, tables and plots go")

    p = sub.add_parser("demo", help="the main job on the embedded default, from nothing")
    _add_config_args(p, required=False)
    p.add_argument("--data", default=None, help="h5ad with raw counts (default: a generated synthetic dataset)")
    p.add_argument("--labels-key", default=None, help="obs column with labels (needed with --data)")
    p.add_argument("--batch-key", default=None, help="obs column with batches")
    p.add_argument("--n-top-genes", type=int, default=2000, help="highly variable genes kept from --data")
    p.add_argument("--out", type=Path, default=Path("demo_output"), help="where the report goes")
    p.add_argument("--tune-epochs", type=int, default=30, help="epochs of each tuning trial")
    return parser


def _demo(args: argparse.Namespace) -> int:
    from distributed_je.config import load_config
    from distributed_je.demo import run_demo

    config = load_config(args.config, args.overrides)
    run_demo(config, data=args.data, labels_key=args.labels_key, batch_key=args.batch_key,
             n_top_genes=args.n_top_genes, out=args.out, tune_epochs=args.tune_epochs)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from distributed_je.convert import convert

    report = convert(args.src, args.dest, layer=args.layer, n_top_genes=args.n_top_genes, genes_file=args.genes,
                     batch_key=args.batch_key, labels_key=args.labels_key, keep_empty=args.keep_empty,
                     overwrite=args.overwrite)
    print(f"wrote {report.dest}: {report.n_cells} cells x {report.n_genes} genes")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from distributed_je.synth import synthesize

    synthesize(args.ref, args.dest, n_cells=args.cells, n_batches=args.n_batches, seed=args.seed,
               overwrite=args.overwrite)
    print(f"wrote {args.dest}: {args.cells} synthetic cells from {args.ref}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from ray.train import TrainingFailedError

    from distributed_je.config import load_config
    from distributed_je.training import run_training

    try:
        result = run_training(load_config(args.config, args.overrides), address=args.address)
    except TrainingFailedError as error:
        print(f"dje train: training failed after its restarts: {error}", file=sys.stderr)
        return 1
    print(f"finished after epoch {int(result.metrics['epoch'])}; latest checkpoint: {result.checkpoint.path}")
    return 0


def _tune(args: argparse.Namespace) -> int:
    from distributed_je.config import load_config
    from distributed_je.tuning import format_rows, run_tune

    outcome = run_tune(load_config(args.config, args.overrides), address=args.address, resume=args.resume)
    print(format_rows(outcome.rows))
    print(f"best: {outcome.best_params}")
    print(f"best config: {outcome.best_config_path}  (dje train {outcome.best_config_path})")
    print(f"results table and plots: {outcome.report_dir}; trials and checkpoints: {outcome.experiment_path}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from distributed_je.artifact import load_model
    from distributed_je.report import evaluate_model, format_report

    report = evaluate_model(load_model(args.model), args.data, labels_key=args.labels_key,
                            condition_key=args.condition_key, out=args.out)
    print(format_report(report))
    print(f"report: {args.out / 'report.md'} (and report.json, PNG plots)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from distributed_je.compare import run_compare
    from distributed_je.config import load_config

    def numbers(text: str, kind: type) -> tuple:
        return tuple(kind(part) for part in text.split(",") if part.strip())

    run_compare(load_config(args.config, args.overrides), variants=[v.strip() for v in args.variants.split(",")],
                out=args.out, diversify=args.diversify_depth, seeds=numbers(args.seeds, int),
                kl_factors=numbers(args.kl_factors, float), labels_key=args.labels_key,
                condition_key=args.condition_key, address=args.address)
    print((args.out / "compare.md").read_text())
    return 0


def _embed(args: argparse.Namespace) -> int:
    from distributed_je.embed import OBSM_KEY, embed

    embed(args.model, args.data, args.out)
    print(f"wrote {args.out} with obsm[{OBSM_KEY!r}]")
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "demo": _demo, "convert": _convert, "synth": _synth, "train": _train, "tune": _tune, "embed": _embed,
    "evaluate": _evaluate, "compare": _compare}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except (ValueError, KeyError, FileNotFoundError) as error:  # bad input: config, counts, sources, stores
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"dje {args.command}: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
