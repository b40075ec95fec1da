import pytest
import torch
import torch.nn.functional as F

from distributed_je import sparse
from distributed_je.nn import BatchLinear, Encoder
from distributed_je.sparse import csr_from_dense

from tests.test_sparse import sparse_counts


def encoder(n_genes, n_batches):
    torch.manual_seed(0)
    return Encoder(n_genes, 8, n_hidden=32, n_layers=2, dropout_rate=0.0, n_batches=n_batches)


@pytest.mark.parametrize("n_batches", [0, 3])
def test_batch_linear_is_a_linear_layer_over_x_joined_with_the_one_hot(n_batches):
    torch.manual_seed(0)
    layer = BatchLinear(20, 7, n_batches)
    x = torch.randn(12, 20)
    one_hot = F.one_hot(torch.arange(12) % 3, 3).float()
    weights = [layer.weight] + ([layer.batch_weight] if n_batches else [])
    joined = torch.cat([x, one_hot], 1) if n_batches else x
    expected = F.linear(joined, torch.cat(weights).T, layer.bias)
    torch.testing.assert_close(layer(x, one_hot if n_batches else None), expected)
    # nn.Linear's initialisation: uniform within 1/sqrt(fan_in), fan_in counting the one-hot
    assert max(w.abs().max() for w in weights + [layer.bias]) <= 1 / (20 + n_batches) ** 0.5


@pytest.mark.parametrize("n_batches", [0, 2])
def test_encoder_reads_sparse_and_dense_counts_alike(n_batches, monkeypatch):
    counts = sparse_counts(density=0.05)
    one_hot = F.one_hot(torch.arange(counts.shape[0]) % 2, 2).float() if n_batches else None
    results = {}
    for layout, max_density in [("sparse", 1.0), ("dense", 0.0)]:
        monkeypatch.setattr(sparse, "MAX_SPARSE_DENSITY", max_density)
        model = encoder(counts.shape[1], n_batches)
        mean, var = model(counts if layout == "dense" else csr_from_dense(counts), one_hot)
        (mean.sum() + var.sum()).backward()
        results[layout] = mean, var, {name: p.grad for name, p in model.named_parameters()}
    (mean_s, var_s, grads_s), (mean_d, var_d, grads_d) = results["sparse"], results["dense"]
    torch.testing.assert_close(mean_s, mean_d, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(var_s, var_d, rtol=1e-4, atol=1e-5)
    for name in grads_d:
        torch.testing.assert_close(grads_s[name], grads_d[name], rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("density", [0.05, 0.9])  # sparse and dense first layer
def test_stacked_views_equal_one_call_per_view_batchnorm_included(density):
    full = sparse_counts(density=density)
    thinned = torch.div(full, 3, rounding_mode="floor")
    one_hot = F.one_hot(torch.arange(full.shape[0]) % 2, 2).float()
    separate, stacked = encoder(full.shape[1], 2), encoder(full.shape[1], 2)
    means = [separate(view, one_hot)[0] for view in (full, thinned)]
    both, _ = stacked(torch.cat([full, thinned]), one_hot.repeat(2, 1), n_views=2)
    torch.testing.assert_close(both, torch.cat(means), rtol=1e-4, atol=1e-5)
    for (name, a), b in zip(separate.state_dict().items(), stacked.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)  # running statistics too


def test_dropout_draws_from_the_generator_passed_in_and_keeps_the_mean():
    from distributed_je.nn import Dropout

    dropout, x = Dropout(0.25), torch.ones(200, 100)
    draw = [dropout(x, torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
    assert torch.equal(draw[0], draw[1]) and not torch.equal(draw[0], draw[2])
    torch.testing.assert_close(draw[0].unique(), torch.tensor([0.0, 1 / 0.75]))  # kept values scaled up
    assert abs((draw[0] == 0).float().mean().item() - 0.25) < 0.01  # 20,000 draws: 3 standard errors
    assert torch.equal(dropout.eval()(x, torch.Generator().manual_seed(0)), x)
