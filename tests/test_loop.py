
from distributed_je.config import load_config
from distributed_je.counts import minibatches
from distributed_je.loop import TrainState, build_model, build_optimizer, epoch_line, fit, kl_weight_at, run_ended
from distributed_je.seeding import derive_seed, numpy_generator
from distributed_je.synthetic import synthetic_counts


def test_kl_warmup_is_linear_in_steps():
    loss = load_config(None, ["loss.kl_weight=2", "loss.kl_warmup_steps=100"]).loss
    assert [kl_weight_at(s, loss) for s in (0, 50, 100, 1000)] == [0.0, 1.0, 2.0, 2.0]
    assert kl_weight_at(0, load_config(None, ["loss.kl_warmup_steps=0"]).loss) == 1.0


def test_derived_seeds_differ_by_rank_epoch_and_stream():
    seeds = {derive_seed(0, r, e, s) for r in range(3) for e in range(3) for s in range(3)}
    assert len(seeds) == 27
    assert derive_seed(1, 2, 3) == derive_seed(1, 2, 3)


def _train(config, matrix, state=None):
    model = build_model(config, matrix.n_genes, matrix.n_batches)
    optimizer = build_optimizer(model, config.optim)

    def batches(epoch):
        return minibatches(matrix, batch_size=64, rng=numpy_generator(config.experiment.seed, 0, epoch), drop_last=True)
    return fit(model, optimizer, config=config, train_batches=batches,
               val_batches=lambda: minibatches(matrix, batch_size=64), state=state)


def test_training_is_deterministic_per_seed():
    matrix = synthetic_counts(300, 60, seed=0)
    config = load_config(None, ["train.max_epochs=2"])
    a, b = _train(config, matrix), _train(config, matrix)
    c = _train(config.replace(**{"experiment.seed": 1}), matrix)
    keys = ("train_loss", "val_recon_nll", "val_cco")
    assert [[m[k] for k in keys] for m in a.history] == [[m[k] for k in keys] for m in b.history]
    assert a.history[-1]["train_loss"] != c.history[-1]["train_loss"]
    assert a.step == 2 * (300 // 64)
    assert a.history[-1]["train_cells"] == 4 * 64


def test_fit_continues_from_a_state():
    matrix = synthetic_counts(200, 40, seed=0)
    config = load_config(None, ["train.max_epochs=3"])
    state = _train(config, matrix, state=TrainState(epoch=2, step=6))
    assert [m["epoch"] for m in state.history] == [3]
    assert state.step == 6 + 200 // 64


def test_a_run_that_had_ended_trains_no_more_when_restored():
    matrix = synthetic_counts(200, 40, seed=0)
    config = load_config(None, ["train.max_epochs=10", "train.early_stopping_patience=1"])
    history = [{"epoch": 1, "val_elbo": 5.0}, {"epoch": 2, "val_elbo": 6.0}]  # stopped after epoch 2
    assert run_ended(TrainState(epoch=2, step=6, history=history), config)
    state = _train(config, matrix, state=TrainState(epoch=2, step=6, history=list(history)))
    assert (state.epoch, state.step, state.history) == (2, 6, history)

    improving = [{"epoch": 1, "val_elbo": 6.0}, {"epoch": 2, "val_elbo": 5.0}]
    assert not run_ended(TrainState(epoch=2, history=improving), config)
    assert run_ended(TrainState(epoch=10, history=improving), config)
    assert not run_ended(TrainState(), config)
    assert not run_ended(TrainState(epoch=3, history=[{"epoch": 3}]), load_config(None, ["train.max_epochs=4"]))


def test_epoch_line_shows_the_terms():
    line = epoch_line({"epoch": 3, "train_loss": 12.5, "val_recon_nll": 10.0, "cells_per_second": 1234.4})
    assert line == "epoch 3: train_loss=12.5 val_recon_nll=10 cells/s=1234"


def test_validation_reports_the_low_depth_scores_and_the_last_epoch_says_so():
    matrix = synthetic_counts(300, 60, seed=0)
    state = _train(load_config(None, ["train.max_epochs=2"]), matrix)
    first, last = state.history
    assert (first["run_complete"], last["run_complete"]) == (0.0, 1.0)
    assert 0.0 <= last["val_knn_kept"] <= 1.0
    assert last["val_low_depth_nll"] > 0
    assert last["val_combined_nll"] == (last["val_recon_nll"] + last["val_low_depth_nll"]) / 2
