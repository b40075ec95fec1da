"""The per-worker training loop: plain torch over any iterable of minibatches.

It runs in one process as it is, and under Ray Train inside each worker (with the model
wrapped in DDP); Ray only orchestrates it. Metrics are summed on the device and reduced
over ranks once per epoch, so every rank reports the same global means.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from distributed_je.collectives import all_reduce_max, all_reduce_sum
from distributed_je.config import Config, LossConfig, OptimConfig
from distributed_je.keys import COUNTS
from distributed_je.module import JESCVI, LossOutput
from distributed_je.seeding import STREAM_INIT, STREAM_TRAIN, STREAM_VALIDATION, derive_seed, torch_generator

Batch = dict[str, torch.Tensor]
TERMS = LossOutput._fields  # loss, recon_nll, kl, cco, elbo
LOW_DEPTH_TERMS = ("low_depth_nll", "knn_kept")
LOW_DEPTH_FRACTION = 0.15  # validation cells are also scored thinned to 15% of their depth
LOW_DEPTH_K = 15


def kl_weight_at(step: int, loss: LossConfig) -> float:
    """Linear KL warm-up counted in optimizer steps: 0 at step 0, the full weight from warmup_steps on."""
    if loss.kl_warmup_steps == 0:
        return loss.kl_weight
    return loss.kl_weight * min(1.0, step / loss.kl_warmup_steps)


def build_model(config: Config, n_genes: int, n_batches: int) -> JESCVI:
    """A freshly initialised model; the weights depend on ``experiment.seed`` only."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(config.experiment.seed, stream=STREAM_INIT))
        return JESCVI(n_genes, n_batches, config.model, config.loss, config.augment)


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters, ~10x faster than the per-tensor loop on CPU
    return torch.optim.Adam(model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay, eps=optim.eps,
                            fused=True)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    """Move a batch to ``device``. Sparse CSR counts travel compressed and are densified on a GPU,
    whose dense matmuls win; on CPU the model reads them at their non-zeros."""
    moved = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
    if moved[COUNTS].layout == torch.sparse_csr and device.type != "cpu":
        moved[COUNTS] = moved[COUNTS].to_dense()
    return moved


class _MetricSums:
    """Cell-weighted sums of named per-batch means, kept on the device until the epoch ends.

    A NaN term (a score undefined on a small batch) is left out of its own sum and count.
    """

    def __init__(self, names: tuple[str, ...], device: torch.device) -> None:
        self.names = names
        self.sums = torch.zeros(2, len(names), device=device, dtype=torch.float64)  # [sum, cells]

    def add(self, values: tuple[torch.Tensor, ...], n_cells: int) -> None:
        terms = torch.stack([t.detach().double() for t in values])
        defined = ~torch.isnan(terms)
        self.sums[0] += torch.where(defined, terms, 0.0) * n_cells
        self.sums[1] += defined * n_cells

    def means(self, prefix: str) -> dict[str, float]:
        sums, cells = all_reduce_sum(self.sums).tolist()
        metrics = {f"{prefix}_{name}": s / c if c else float("nan") for name, s, c in zip(self.names, sums, cells)}
        metrics[f"{prefix}_cells"] = cells[0]
        return metrics


@dataclass
class TrainState:
    """What a checkpoint must hold to continue training exactly where it stopped."""

    epoch: int = 0  # epochs completed
    step: int = 0   # optimizer steps taken
    history: list[dict[str, float]] = field(default_factory=list)


def train_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, batches: Iterable[Batch], *,
                state: TrainState, config: Config, rank: int = 0, device: torch.device | str = "cpu"
                ) -> dict[str, float]:
    """One pass over ``batches``; advances ``state.step`` and returns global ``train_*`` means."""
    device = torch.device(device)
    model.train()
    generator = torch_generator(config.experiment.seed, rank, state.epoch, STREAM_TRAIN, device)
    sums = _MetricSums(TERMS, device)
    start = time.perf_counter()
    for batch in batches:
        batch = _to_device(batch, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(batch, kl_weight=kl_weight_at(state.step, config.loss), generator=generator)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        sums.add(out, batch[COUNTS].shape[0])
        state.step += 1
    metrics = sums.means("train")
    seconds = time.perf_counter() - start
    metrics.update(
        train_seconds=seconds,
        cells_per_second=metrics["train_cells"] / max(seconds, 1e-9),
        kl_weight=kl_weight_at(state.step, config.loss),
        lr=optimizer.param_groups[0]["lr"],
    )
    return metrics


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[Batch], *, config: Config, rank: int = 0,
             device: torch.device | str = "cpu", prefix: str = "val") -> dict[str, float]:
    """Global ``{prefix}_*`` means of every term with the full KL weight, in evaluation mode, and
    the label-free low-depth scores (``JESCVI.low_depth_scores``) with their combination
    ``{prefix}_combined_nll``, the mean of the full-depth and the low-depth reconstruction NLL.

    The generator is the same every epoch, so validation metrics compare across epochs.
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    module = getattr(model, "module", model)  # unwrapped from DDP
    generator = torch_generator(config.experiment.seed, rank, 0, STREAM_VALIDATION, device)
    sums = _MetricSums(TERMS + LOW_DEPTH_TERMS, device)
    for batch in batches:
        batch = _to_device(batch, device)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = model(batch, generator=generator)
            low_depth = module.low_depth_scores(batch, fraction=LOW_DEPTH_FRACTION, k=LOW_DEPTH_K,
                                                generator=generator)
        sums.add((*out, *low_depth), batch[COUNTS].shape[0])
    model.train(was_training)
    metrics = sums.means(prefix)
    metrics[f"{prefix}_combined_nll"] = (metrics[f"{prefix}_recon_nll"] + metrics[f"{prefix}_low_depth_nll"]) / 2
    return metrics


def fit(model: nn.Module, optimizer: torch.optim.Optimizer, *, config: Config,
        train_batches: Callable[[int], Iterable[Batch]], val_batches: Callable[[], Iterable[Batch]],
        state: TrainState | None = None, rank: int = 0, device: torch.device | str = "cpu",
        on_epoch_end: Callable[[TrainState, dict[str, float]], None] | None = None) -> TrainState:
    """Train from ``state`` (fresh by default) up to ``train.max_epochs``.

    ``train_batches(epoch)`` gives that epoch's shuffled minibatches; ``on_epoch_end`` sees
    the state and that epoch's metrics (logging, checkpoints, reporting).
    """
    state = state or TrainState()
    started = time.monotonic()
    while not run_ended(state, config):
        metrics = train_epoch(model, optimizer, train_batches(state.epoch), state=state, config=config,
                              rank=rank, device=device)
        metrics.update(evaluate(model, val_batches(), config=config, rank=rank, device=device))
        state.epoch += 1
        metrics["epoch"] = state.epoch
        state.history.append(metrics)
        reason = stop_reason(state, config, seconds=all_reduce_max(time.monotonic() - started))
        # 1 on the last epoch: a run that ends without it was stopped from outside (e.g. by ASHA).
        metrics["run_complete"] = float(bool(reason) or state.epoch >= config.train.max_epochs)
        if on_epoch_end is not None:
            on_epoch_end(state, metrics)
        if reason:
            if rank == 0:
                say(f"stopping after epoch {state.epoch}: {reason}")
            break
    return state


def run_ended(state: TrainState, config: Config) -> bool:
    """Whether ``state`` (say, restored from a checkpoint) has nothing left to train: all epochs
    done, or early stopping had stopped it. A spent time budget does not count: it is per run."""
    return state.epoch >= config.train.max_epochs or (
        bool(state.history) and stop_reason(state, config, seconds=0) is not None)


def stop_reason(state: TrainState, config: Config, *, seconds: float) -> str | None:
    """Why training should stop now (the same answer on every rank: metrics and time are global)."""
    train = config.train
    if train.time_budget_s and seconds >= train.time_budget_s:
        return f"time budget of {train.time_budget_s:g} s spent"
    if train.early_stopping_patience:
        values = [m[train.monitor_metric] for m in state.history if train.monitor_metric in m]
        if not values:
            raise KeyError(f"train.monitor_metric={train.monitor_metric!r} is not among the metrics; "
                           f"available: {', '.join(sorted(state.history[-1]))}")
        best = int(np.argmin(values) if train.monitor_mode == "min" else np.argmax(values))
        if len(values) - 1 - best >= train.early_stopping_patience:
            return f"{train.monitor_metric} has not improved for {train.early_stopping_patience} epochs"
    return None


def say(line: str) -> None:
    """One progress line on stdout. Not ``print``: in a Ray Train worker, Ray patches ``print`` to
    log each line as well, and the driver would show it twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def epoch_line(metrics: dict[str, float]) -> str:
    """One progress line per epoch: the terms that tell whether training is healthy."""
    shown = ("train_loss", "train_recon_nll", "train_kl", "train_cco", "val_recon_nll", "val_elbo", "val_cco",
             "val_low_depth_nll", "val_knn_kept")
    terms = " ".join(f"{key}={metrics[key]:.4g}" for key in shown if key in metrics)
    return f"epoch {int(metrics['epoch'])}: {terms} cells/s={metrics['cells_per_second']:.0f}"
