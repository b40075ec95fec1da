"""Ray Train: the per-worker function and the driver that builds the ``TorchTrainer``.

The worker wraps the plain loop (``loop.fit``): it builds its loader shard and the model,
restores the latest checkpoint when there is one, wraps the model in DDP, and at each
epoch's end reports the global metrics with a checkpoint written by rank 0. Plain training
(``dje train``) and tuning call the same ``run_training``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from distributed_je.config import Config

CONTROLLER_POLL_INTERVAL_S = 0.2


def train_worker(config_dict: dict) -> None:
    """Runs in every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch

    from distributed_je.artifact import load_training_state, save_checkpoint
    from distributed_je.loader import StoreLoader
    from distributed_je.loop import build_model, build_optimizer, epoch_line, fit, run_ended, say
    from distributed_je.store import open_store

    _quiet_report_logging()
    config = Config.from_dict(config_dict)
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    seed = config.experiment.seed
    store = open_store(os.path.expandvars(config.data.store))
    train = StoreLoader.from_config(store, config.data, split="train", seed=seed, rank=rank, world_size=world_size)
    val = (StoreLoader.from_config(store, config.data, split="val", seed=seed, rank=rank, world_size=world_size)
           if config.data.validation_fraction > 0 else None)
    model = build_model(config, store.n_genes, train.n_batches_store).to(device)
    optimizer = build_optimizer(model, config.optim)
    batch_categories = store.categories(config.data.batch_key) if config.data.batch_key else ["0"]

    state = None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            state = load_training_state(directory, model, optimizer)
        if rank == 0:
            say(f"resuming from the checkpoint after epoch {state.epoch}")
    if state is not None and run_ended(state, config):
        # The run had ended before this restart (a Tune driver killed before it recorded the trial
        # as finished restarts it): report the last epoch again, so the caller gets its result.
        if rank == 0:
            say(f"the run had already ended after epoch {state.epoch}; reporting that epoch again")
        ray.train.report(state.history[-1])
        return
    ddp_model = ray.train.torch.prepare_model(model)

    def on_epoch_end(state, metrics):
        with tempfile.TemporaryDirectory() as directory:
            saved = None
            if rank == 0:  # side effects on rank 0 only; every rank reports the same metrics
                save_checkpoint(directory, model=model, optimizer=optimizer, state=state, config=config,
                                gene_names=store.gene_names, batch_categories=batch_categories)
                saved = ray.train.Checkpoint.from_directory(directory)
                say(epoch_line(metrics))
            ray.train.report(metrics, checkpoint=saved, checkpoint_dir_name=f"epoch_{state.epoch:05d}")

    torch.set_num_threads(max(1, int(config.scaling.cpus_per_worker)))
    fit(ddp_model, optimizer, config=config, train_batches=train.epoch,
        val_batches=lambda: val.epoch(0) if val is not None else iter(()),
        state=state, rank=rank, device=device, on_epoch_end=on_epoch_end)


def _quiet_report_logging() -> None:
    """Keep Ray Train from logging every rank's whole metrics dict on every report: rank 0's epoch
    line says it once. Its logger is named by file path, out of reach of RunConfig's log level."""
    with contextlib.suppress(ImportError, AttributeError):  # a private module: cosmetic only
        from ray.train.v2._internal.execution import context

        context.logger.setLevel(logging.WARNING)


def storage_root(config: Config) -> str:
    """``experiment.storage_path`` with $VARS expanded; local paths made absolute (Ray needs that)."""
    path = os.path.expandvars(config.experiment.storage_path)  # e.g. ${DJE_STORAGE_PATH}/runs
    return path if "://" in path else str(Path(path).expanduser().resolve())


def resolve_store(config: Config) -> Config:
    """The config with a relative local ``data.store`` made absolute (Ray workers do not run in
    the driver's directory), checked to exist when the driver can see it: a wrong path fails
    here, at once, not in every worker after every restart. Paths with $VARS expand on the nodes."""
    from distributed_je.store import open_store

    location = config.data.store
    if not location:
        raise ValueError("data.store is empty: give the zarr store to train on (dje convert makes one)")
    if "$" in location:
        return config
    if "://" not in location:
        location = str(Path(location).expanduser().resolve())
    open_store(location)
    return config.replace(**{"data.store": location})


def join_storage(root: str, *parts: str) -> str:
    """A path under a storage root, local or URL (``os.path.join`` would break ``s3://``)."""
    return "/".join([root.rstrip("/"), *parts])


def run_training(config: Config, *, address: str | None = None, callbacks: list | None = None):
    """Train with Ray Train on a local Ray (no address) or the cluster at ``address``/$RAY_ADDRESS.

    Running again with the same experiment name and storage path resumes from the latest
    checkpoint. ``callbacks`` go to the run config (a Tune trial passes ``TuneReportCallback``).
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    config = resolve_store(config)
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS") or None)
    # Ray Train V2 workers hand each report to a queue of size 1 that the controller drains
    # once per health check (2 s by default): epochs shorter than that would wait for it.
    # The driver's value propagates to the controller.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(CONTROLLER_POLL_INTERVAL_S))
    scaling, train = config.scaling, config.train
    workers = (scaling.min_workers, scaling.num_workers) if scaling.min_workers else scaling.num_workers
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config.to_dict(),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=scaling.use_gpu,
                                     resources_per_worker={"CPU": scaling.cpus_per_worker},
                                     placement_strategy=scaling.placement_strategy),
        run_config=RunConfig(
            name=config.experiment.name, storage_path=storage_root(config), callbacks=callbacks,
            checkpoint_config=CheckpointConfig(num_to_keep=train.checkpoints_to_keep,
                                               checkpoint_score_attribute=train.monitor_metric,
                                               checkpoint_score_order=train.monitor_mode),
            failure_config=FailureConfig(max_failures=train.max_failures,
                                         max_preemption_failures=train.max_preemption_failures,
                                         preemption_grace_s=train.preemption_grace_s),
        ),
    )
    return trainer.fit()
