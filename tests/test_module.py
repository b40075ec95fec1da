import numpy as np
import pytest
import torch

from distributed_je.config import ConfigError, load_config
from distributed_je.counts import minibatches, read_h5ad
from distributed_je.keys import BATCH_INDEX, COUNTS
from distributed_je.loop import build_model, build_optimizer, evaluate, fit
from distributed_je.module import LossWeights
from distributed_je.seeding import numpy_generator
from distributed_je.split import validation_mask
from distributed_je.synthetic import synthetic_counts


def tiny_batch(n_cells=32, n_genes=50, n_batches=2):
    matrix = synthetic_counts(n_cells, n_genes, n_types=3, n_batches=n_batches, seed=0)
    return next(minibatches(matrix, batch_size=n_cells)), matrix


@pytest.mark.parametrize("variant", ["scvi", "thinning_only", "denoising", "je", "je_only"])
@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_every_variant_and_likelihood_gives_finite_terms_and_gradients(variant, likelihood):
    batch, matrix = tiny_batch()
    config = load_config(None, [f"model.variant={variant}", f"model.likelihood={likelihood}",
                                "model.dispersion=gene-batch"])
    model = build_model(config, matrix.n_genes, matrix.n_batches)
    out = model(batch, generator=torch.Generator().manual_seed(0))
    for name, value in out._asdict().items():
        assert torch.isfinite(value), f"{variant}/{likelihood}: {name} is {value}"
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    uses_je = variant in ("je", "je_only")
    assert (out.cco > 0) == uses_je


def test_variant_weights():
    loss = load_config(None, ["loss.je_weight=50", "loss.reconstruction_weight=2"]).loss
    assert LossWeights.for_variant("je", loss) == LossWeights(reconstruction=2.0, je=50.0)
    assert LossWeights.for_variant("je_only", loss) == LossWeights(reconstruction=0.0, je=50.0)
    assert LossWeights.for_variant("scvi", loss) == LossWeights(reconstruction=2.0, je=0.0)
    assert LossWeights.for_variant("thinning_only", loss) == LossWeights(reconstruction=2.0, je=0.0)


def test_thinning_only_reconstructs_the_thinned_copy_and_denoising_the_original():
    batch, matrix = tiny_batch(n_cells=64, n_genes=200)

    def recon(variant):
        config = load_config(None, [f"model.variant={variant}", "augment.min_library_size=1"])
        model = build_model(config, matrix.n_genes, matrix.n_batches)
        return float(model(batch, generator=torch.Generator().manual_seed(0)).recon_nll)

    scvi, thinning_only, denoising = recon("scvi"), recon("thinning_only"), recon("denoising")
    # thinned copies hold far fewer counts, so their NLL is far smaller; denoising targets y itself
    assert thinning_only < 0.7 * scvi
    assert 0.8 * scvi < denoising < 1.25 * scvi


def test_loss_is_the_weighted_sum_of_its_terms():
    batch, matrix = tiny_batch()
    config = load_config(None, ["loss.je_weight=7", "loss.kl_weight=0.3"])
    model = build_model(config, matrix.n_genes, matrix.n_batches).eval()  # no dropout draws
    out = model(batch, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.loss, out.recon_nll + 0.3 * out.kl + 7 * out.cco, rtol=1e-5)
    half_kl = model(batch, kl_weight=0.15, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(half_kl.loss, out.recon_nll + 0.15 * out.kl + 7 * out.cco, rtol=1e-5)


def test_same_seed_same_loss_and_other_seed_other_thinning():
    batch, matrix = tiny_batch()
    model = build_model(load_config(), matrix.n_genes, matrix.n_batches).eval()
    a = model(batch, generator=torch.Generator().manual_seed(1))
    b = model(batch, generator=torch.Generator().manual_seed(1))
    c = model(batch, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.loss, b.loss) and not torch.equal(a.cco, c.cco)


def test_in_training_every_draw_dropout_included_comes_from_the_generator():
    batch, matrix = tiny_batch()
    model = build_model(load_config(), matrix.n_genes, matrix.n_batches).train()
    losses = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)  # torch's global generator must not matter
        losses.append(model(batch, generator=torch.Generator().manual_seed(1)).loss)
    assert torch.equal(*losses)


def test_encode_and_bias_point():
    batch, matrix = tiny_batch()
    model = build_model(load_config(None, ["model.n_latent=7"]), matrix.n_genes, matrix.n_batches)
    model.train()
    z = model.encode(batch[COUNTS], batch[BATCH_INDEX])
    assert z.shape == (32, 7) and model.training, "encode must restore training mode"
    f0 = model.bias_point()
    assert f0.shape == (7,)
    zero_cells = torch.zeros(3, matrix.n_genes)
    assert torch.allclose(model.encode(zero_cells, torch.zeros(3, dtype=torch.long)), f0.expand(3, 7))


def test_same_seed_builds_the_same_weights():
    config = load_config(None, ["experiment.seed=5"])
    a, b = build_model(config, 20, 1), build_model(config, 20, 1)
    c = build_model(config.replace(**{"experiment.seed": 6}), 20, 1)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))


def test_invalid_model_config_values_raise_clear_errors():
    with pytest.raises(ConfigError, match="model.likelihood='gauss' is not allowed"):
        load_config(None, ["model.likelihood=gauss"])
    with pytest.raises(ValueError, match="n_genes=0"):
        build_model(load_config(), 0, 1)


@pytest.mark.data
def test_training_on_real_pbmc3k_lowers_held_out_nll(pbmc3k_path):
    matrix = read_h5ad(pbmc3k_path, n_top_genes=1000)
    held_out = validation_mask(matrix.cell_names, 0.1)
    train, val = matrix.subset_cells(np.flatnonzero(~held_out)), matrix.subset_cells(np.flatnonzero(held_out))
    config = load_config(None, ["train.max_epochs=15", "data.batch_size=128", "loss.kl_warmup_steps=100"])
    model = build_model(config, train.n_genes, 1)
    before = evaluate(model, minibatches(val, batch_size=512), config=config)["val_recon_nll"]
    state = fit(model, build_optimizer(model, config.optim), config=config,
                train_batches=lambda e: minibatches(train, batch_size=128, rng=numpy_generator(0, 0, e), drop_last=True),
                val_batches=lambda: minibatches(val, batch_size=512))
    assert state.step >= 15 * (train.n_cells // 128) >= 250  # "a few hundred steps"
    after = state.history[-1]["val_recon_nll"]
    assert after < 0.8 * before
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
    assert state.history[-1]["val_cco"] < state.history[0]["val_cco"]


@pytest.mark.parametrize("variant", ["scvi", "je", "thinning_only"])
def test_sparse_and_dense_encoder_inputs_give_the_same_objective(variant, monkeypatch):
    from distributed_je import sparse
    from tests.test_sparse import sparse_counts

    counts = sparse_counts(n_cells=48, n_genes=200, density=0.06)
    batch = {COUNTS: counts, BATCH_INDEX: torch.arange(48) % 2}
    config = load_config(None, [f"model.variant={variant}"])
    results = {}
    for layout, max_density in [("sparse", 1.0), ("dense", 0.0)]:
        monkeypatch.setattr(sparse, "MAX_SPARSE_DENSITY", max_density)
        model = build_model(config, 200, 2)
        out = model(batch, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        results[layout] = out, {name: p.grad for name, p in model.named_parameters()}
    (out_s, grads_s), (out_d, grads_d) = results["sparse"], results["dense"]
    for name in out_d._fields:
        torch.testing.assert_close(getattr(out_s, name), getattr(out_d, name), rtol=1e-4, atol=1e-4, msg=name)
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.parametrize("variant,likelihood", [("scvi", "nb"), ("je", "nb"), ("thinning_only", "nb"),
                                                ("denoising", "nb"), ("je", "zinb")])
def test_csr_and_dense_batches_give_the_same_objective_gradients_and_scores(variant, likelihood):
    """The loader hands CSR batches, which the model reads at their non-zeros on CPU."""
    from tests.test_sparse import sparse_counts

    counts = sparse_counts(n_cells=48, n_genes=200, density=0.06)
    config = load_config(None, [f"model.variant={variant}", f"model.likelihood={likelihood}"])
    results = {}
    for layout, batch_counts in [("csr", counts.to_sparse_csr()), ("dense", counts)]:
        batch = {COUNTS: batch_counts, BATCH_INDEX: torch.arange(48) % 2}
        model = build_model(config, 200, 2)
        out = model(batch, generator=torch.Generator().manual_seed(1))
        out.loss.backward()
        scores = model.low_depth_scores(batch, fraction=0.2, k=5, generator=torch.Generator().manual_seed(2))
        results[layout] = out, scores, {name: p.grad for name, p in model.named_parameters()}
    (out_c, scores_c, grads_c), (out_d, scores_d, grads_d) = results["csr"], results["dense"]
    for name in out_d._fields:
        torch.testing.assert_close(getattr(out_c, name), getattr(out_d, name), rtol=1e-5, atol=1e-5, msg=name)
    torch.testing.assert_close(scores_c, scores_d, rtol=1e-5, atol=1e-5)
    for name in grads_d:
        torch.testing.assert_close(grads_c[name], grads_d[name], rtol=1e-4, atol=1e-5, msg=name)
