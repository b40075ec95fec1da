"""Hyperparameter search: Ray Tune + Optuna (TPE) + ASHA, each trial a Ray Train run.

The ``tune:`` section declares a flat search space over dotted config paths::

    search_space:
      loss.kl_weight: {loguniform: [0.1, 10]}
      loss.je_weight: {loguniform: [10, 1000]}
      augment.min_library_size: {loguniform: [5, 200]}
      optim.lr: {loguniform: [0.0003, 0.01]}
      model.n_latent: {choice: [10, 32]}

Each trial is a Tune function trainable that launches its own ``TorchTrainer`` (the pattern
Ray Train V2 supports) with ``TuneReportCallback`` forwarding the per-epoch metrics. ASHA
stops weak trials early, counting time in training epochs (``epoch`` survives a resume;
Tune's iteration counter restarts). A trial that ASHA stops is told to Optuna as PRUNED, with
its per-epoch values as intermediate values, not as COMPLETE with a partial metric: TPE then
ranks it below every trial that ran to the end instead of mistaking an early value for a
final one.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from distributed_je.config import Config, ConfigError
from distributed_je.training import join_storage, resolve_store, run_training, storage_root

DOMAINS = ("uniform", "loguniform", "int", "choice")
RANGE_DOMAINS = ("uniform", "loguniform", "int")
# Sections a trial may not vary: they name the experiment, its data, or the search itself.
FIXED_SECTIONS = ("experiment", "data", "tune")
TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes


@dataclass(frozen=True)
class Domain:
    kind: str      # one of DOMAINS
    values: tuple  # (low, high) for ranges, the options for choice

    def to_tune(self):
        from ray import tune

        low, high = self.values[0], self.values[-1]
        if self.kind == "uniform":
            return tune.uniform(low, high)
        if self.kind == "loguniform":
            return tune.loguniform(low, high)
        if self.kind == "int":
            return tune.randint(low, high + 1)  # randint's upper bound is exclusive
        return tune.choice(list(self.values))


def parse_search_space(config: Config) -> dict[str, Domain]:
    """Check ``tune.search_space`` against the config before any trial starts.

    A path must name a config key outside the experiment, data and tune sections; a domain is
    one of uniform/loguniform/int with [low, high] or choice with a list of plain values; both
    ends (and every choice) must be values the key allows. Nested domains are refused.
    """
    space = {}
    for path, spec in config.tune.search_space.items():
        where = f"tune.search_space.{path}"
        if path.split(".")[0] in FIXED_SECTIONS:
            raise ConfigError(f"{where}: a trial may not vary the {', '.join(FIXED_SECTIONS)} sections")
        if not isinstance(spec, Mapping) or len(spec) != 1:
            raise ConfigError(f"{where}={spec!r} is not a domain: write {{KIND: VALUES}} with KIND one of "
                              f"{', '.join(DOMAINS)}, e.g. {{loguniform: [0.1, 10]}}")
        (kind, values), = spec.items()
        if kind not in DOMAINS:
            raise ConfigError(f"{where}: unknown domain {kind!r}; choose one of {', '.join(DOMAINS)}")
        if not isinstance(values, (list, tuple)) or not values:
            raise ConfigError(f"{where}.{kind}={values!r} must be a non-empty list")
        if any(isinstance(v, (Mapping, list, tuple)) for v in values):
            raise ConfigError(f"{where}.{kind}={values!r}: nested domains are not supported; "
                              "the search space is flat, one domain per config key")
        if kind in RANGE_DOMAINS:
            _check_range_domain(where, kind, values)
        for value in values:
            try:
                config.replace(**{path: value})
            except ConfigError as error:
                raise ConfigError(f"{where}: {error}") from None
        space[path] = Domain(kind, tuple(values))
    _check_objective(config, space)
    if config.tune.grace_period > config.train.max_epochs:
        raise ConfigError(f"tune.grace_period={config.tune.grace_period} is out of range: allowed "
                          f"[1, train.max_epochs={config.train.max_epochs}]")
    return space


def _check_range_domain(where: str, kind: str, values: list) -> None:
    numeric = len(values) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if not numeric or not values[0] < values[1]:
        raise ConfigError(f"{where}.{kind}={values!r} must be [low, high] with low < high")
    if kind == "loguniform" and values[0] <= 0:
        raise ConfigError(f"{where}.loguniform={values!r}: low must be > 0")
    if kind == "int" and not all(isinstance(v, int) for v in values):
        raise ConfigError(f"{where}.int={values!r}: low and high must be integers")


def _check_objective(config: Config, space: Mapping[str, Domain]) -> None:
    """An objective that contains a searched weight rewards the weight, not the model: refuse it."""
    weights = [path for path in space if path.startswith("loss.") and path.endswith("_weight")]
    weighted = [m for m in config.tune.metrics if m.endswith("_loss")]
    if weights and weighted:
        raise ConfigError(f"tune.metric={config.tune.metric!r}: {', '.join(weighted)} contains the searched "
                          f"weights {', '.join(weights)}; optimise a weight-free metric such as "
                          "val_combined_nll, val_recon_nll, val_low_depth_nll or val_knn_kept")


def run_trial(params: dict[str, Any], *, base: dict) -> None:
    """One trial: the base config with the sampled values, trained with Ray Train.

    Its Train run lives under ``<storage>/<experiment>/trials/<trial id>``; a trial that Tune
    restarts (after a failure or ``--resume``) resumes that run from its latest checkpoint.
    """
    import ray.tune
    from ray.tune.integration.ray_train import TuneReportCallback

    config = Config.from_dict(base)
    trial_id = ray.tune.get_context().get_trial_id()
    config = config.replace(**params, **{
        "experiment.name": trial_id,
        "experiment.storage_path": join_storage(storage_root(config), config.experiment.name, "trials"),
    })
    run_training(config, callbacks=[TuneReportCallback()])


def _make_searcher(config: Config, space: Mapping[str, Domain]):
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    class PrunedAwareOptunaSearch(OptunaSearch):
        """Optuna sees per-epoch values at their epoch, and ASHA-stopped trials as PRUNED."""

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            if isinstance(self.metric, list) or trial_id in self._completed_trials:
                return  # Optuna takes no intermediate values for several objectives
            value = result.get(self.metric)
            if value is not None and math.isfinite(value):
                self._ot_trials[trial_id].report(value, int(result["epoch"]))

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            stopped_early = bool(result) and not error and not result.get("run_complete")
            super().on_trial_complete(trial_id, None if stopped_early else result, error)

    points = [dict(point) for point in config.tune.points_to_evaluate]
    for point in points:
        unknown = set(point) - set(space)
        if unknown:
            raise ConfigError(f"tune.points_to_evaluate: {sorted(unknown)} are not in tune.search_space "
                              f"({', '.join(space)})")
    sampler = optuna.samplers.TPESampler(seed=config.experiment.seed)
    metrics, modes = config.tune.metrics, config.tune.modes
    return PrunedAwareOptunaSearch(
        metric=metrics if len(metrics) > 1 else metrics[0], mode=modes if len(modes) > 1 else modes[0],
        points_to_evaluate=points or None, sampler=sampler)


@dataclass(frozen=True)
class TuneOutcome:
    experiment_path: str
    rows: list[dict]            # one per trial, see ``trial_rows``
    best_params: dict[str, Any]
    best_config_path: Path
    report_dir: Path


def run_tune(config: Config, *, address: str | None = None, resume: bool = False,
             report_dir: Path | None = None) -> TuneOutcome:
    """Run (or with ``resume`` continue) the search; write the table, the best config and the plots."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    space = parse_search_space(config)
    config = resolve_store(config)
    if not space:
        raise ConfigError("tune.search_space is empty: declare at least one dotted config path and its domain")
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None)
    root, name = storage_root(config), config.experiment.name
    path = join_storage(root, name)
    # The trial driver only waits on its Train workers, which ask for their own CPUs and GPUs; it
    # holds no CPU (Tune refuses an empty request, so it asks for a little memory instead).
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=config.to_dict()),
                                    {"cpu": 0, "memory": TRIAL_DRIVER_MEMORY})
    if resume:
        if not tune.Tuner.can_restore(path):
            raise FileNotFoundError(f"--resume: no experiment to resume at {path}")
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if tune.Tuner.can_restore(path):
            raise ConfigError(f"experiment.name={name!r} already has an experiment at {path}: continue it with "
                              "--resume, or choose another experiment.name")
        scheduler = ASHAScheduler(time_attr="epoch", metric=config.tune.metrics[0], mode=config.tune.modes[0],
                                  max_t=config.train.max_epochs, grace_period=config.tune.grace_period,
                                  reduction_factor=config.tune.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space={key: domain.to_tune() for key, domain in space.items()},
            tune_config=tune.TuneConfig(search_alg=_make_searcher(config, space), scheduler=scheduler,
                                        num_samples=config.tune.num_samples,
                                        max_concurrent_trials=config.tune.max_concurrent_trials),
            run_config=tune.RunConfig(name=name, storage_path=root),
        )
    grid = tuner.fit()
    rows = trial_rows(grid, list(space), config)
    report_dir = report_dir or (Path(path) if "://" not in path else Path.cwd() / f"{name}_tune_report")
    return write_report(rows, config, experiment_path=path, report_dir=report_dir)


def trial_rows(grid, params: list[str], config: Config) -> list[dict]:
    """One row per trial: id, parameters, last metrics, epochs run and status."""
    rows = []
    shown = list(dict.fromkeys([*config.tune.metrics, "val_recon_nll", "val_low_depth_nll", "val_knn_kept"]))
    for result in grid:
        metrics = result.metrics or {}
        if result.error is not None:
            status = "error"
        elif metrics.get("run_complete"):
            status = "complete"
        else:
            status = "stopped early (ASHA)"
        row = {"trial": metrics.get("trial_id") or Path(result.path).name, "status": status,
               "epochs": int(metrics.get("epoch", 0))}
        row.update({key: result.config.get(key) for key in params})
        row.update({key: metrics.get(key, float("nan")) for key in shown})
        rows.append(row)
    return sorted(rows, key=lambda row: row["trial"])


def best_row(rows: list[dict], config: Config) -> dict:
    """The best trial among those that trained to the end (all trials if none did).

    With several objectives: the Pareto-optimal trial that is best on the first objective.
    """
    metrics, modes = config.tune.metrics, config.tune.modes
    finite = [r for r in rows if all(math.isfinite(r[m]) for m in metrics)]
    pool = [r for r in finite if r["status"] == "complete"] or finite
    if not pool:
        raise RuntimeError("no trial reported its objective; see the trial errors above")

    def oriented(row):  # smaller is better in every coordinate
        return [row[m] if mode == "min" else -row[m] for m, mode in zip(metrics, modes)]

    front = [r for r in pool if not any(_dominates(oriented(o), oriented(r)) for o in pool)]
    return min(front, key=lambda r: oriented(r)[0])


def _dominates(a: list[float], b: list[float]) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def write_report(rows: list[dict], config: Config, *, experiment_path: str, report_dir: Path) -> TuneOutcome:
    report_dir.mkdir(parents=True, exist_ok=True)
    params = list(config.tune.search_space)
    best = best_row(rows, config)
    best_params = {key: best[key] for key in params}

    with open(report_dir / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    best_config = config.replace(**best_params, **{"experiment.name": f"{config.experiment.name}-best"})
    best_config_path = report_dir / "best_config.yaml"
    best_config_path.write_text(
        f"# Best trial {best['trial']} of the tune experiment at {experiment_path}\n"
        f"# ({', '.join(f'{m}={best[m]:.6g}' for m in config.tune.metrics)}). Train it with:\n"
        f"#   dje train {best_config_path}\n"
        + yaml.safe_dump(best_config.to_dict(), sort_keys=False))
    plot_trials(rows, params, config.tune.metrics[0], report_dir)
    return TuneOutcome(experiment_path, rows, best_params, best_config_path, report_dir)


def plot_trials(rows: list[dict], params: list[str], metric: str, out: Path) -> None:
    """``objective.png``: the objective per trial; ``params.png``: each hyperparameter against it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"complete": "tab:blue", "stopped early (ASHA)": "tab:orange", "error": "tab:red"}
    values = [row[metric] for row in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for status, colour in colours.items():
        index = [i for i, row in enumerate(rows) if row["status"] == status]
        ax.scatter(index, [values[i] for i in index], c=colour, label=status)
    ax.set(xlabel="trial", ylabel=metric, title="objective over trials")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "objective.png", dpi=100)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(params), figsize=(4 * len(params), 3.5), squeeze=False)
    for ax, param in zip(axes[0], params):
        for status, colour in colours.items():
            chosen = [row for row in rows if row["status"] == status]
            ax.scatter([_plottable(r[param]) for r in chosen], [r[metric] for r in chosen], c=colour, label=status)
        numbers = [r[param] for r in rows if isinstance(r[param], (int, float))]
        if numbers and min(numbers) > 0 and max(numbers) / min(numbers) > 20:
            ax.set_xscale("log")
        ax.set(xlabel=param, ylabel=metric)
    fig.tight_layout()
    fig.savefig(out / "params.png", dpi=100)
    plt.close(fig)


def _plottable(value: Any) -> Any:
    return value if isinstance(value, (int, float)) else str(value)


def format_rows(rows: list[dict]) -> str:
    """The results table as aligned text, one line per trial."""
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    columns = list(rows[0])
    table = [[cell(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in table)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in table]
    return "\n".join(lines)
