import numpy as np
import pytest
import torch
from scipy import stats

from distributed_je.distributions import kl_normal_standard, log_likelihood, log_nb, log_poisson, log_zinb


@pytest.fixture
def values():
    rng = np.random.default_rng(0)
    x = rng.negative_binomial(2, 0.1, 500).astype(np.float64)
    x[:50] = 0
    mu = rng.gamma(2.0, 5.0, 500)
    theta = rng.gamma(2.0, 2.0, 500)
    logits = rng.normal(0, 2, 500)
    return x, mu, theta, logits


def t(a):
    return torch.tensor(a, dtype=torch.float64)


def test_nb_matches_scipy(values):
    x, mu, theta, _ = values
    expected = stats.nbinom.logpmf(x, theta, theta / (theta + mu))
    np.testing.assert_allclose(log_nb(t(x), t(mu), t(theta)).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_zinb_matches_mixture_closed_form(values):
    x, mu, theta, logits = values
    pi = 1 / (1 + np.exp(-logits))
    nb = stats.nbinom.pmf(x, theta, theta / (theta + mu))
    expected = np.log(pi * (x == 0) + (1 - pi) * nb)
    np.testing.assert_allclose(log_zinb(t(x), t(mu), t(theta), t(logits)).numpy(), expected, rtol=1e-6, atol=1e-6)


def test_poisson_matches_scipy(values):
    x, mu, _, _ = values
    np.testing.assert_allclose(log_poisson(t(x), t(mu)).numpy(), stats.poisson.logpmf(x, mu), rtol=1e-6, atol=1e-6)


def test_dispatch_and_unknown_likelihood(values):
    x, mu, theta, logits = (t(v) for v in values)
    assert torch.equal(log_likelihood("nb", x, mu, theta, logits), log_nb(x, mu, theta))
    with pytest.raises(ValueError, match="nb, zinb, poisson"):
        log_likelihood("gaussian", x, mu, theta, logits)


def test_kl_to_standard_normal_matches_torch():
    g = torch.Generator().manual_seed(0)
    mean, var = torch.randn(30, 5, generator=g), torch.rand(30, 5, generator=g) + 0.1
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, var.sqrt()), torch.distributions.Normal(0.0, 1.0)).sum(-1)
    assert torch.allclose(kl_normal_standard(mean, var), expected, atol=1e-6)


@pytest.mark.parametrize("per_cell_theta", [False, True])
def test_nb_nll_per_cell_equals_the_dense_sum_with_gradients(per_cell_theta):
    from distributed_je.distributions import TABLED_COUNT, nb_nll_per_cell
    from distributed_je.sparse import Entries

    g = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(20, 30, generator=g) * 2, generator=g).double()
    x[::3, ::4] = torch.tensor([TABLED_COUNT, TABLED_COUNT + 1, 57.0, 300.0]).double().repeat(2)  # tabled and not
    mu = (torch.rand(20, 30, generator=g).double() * 5 + 0.1).requires_grad_()
    shape = (20, 30) if per_cell_theta else (1, 30)
    theta = (torch.rand(shape, generator=g).double() * 3 + 0.1).requires_grad_()
    weights = torch.rand(20, generator=g).double()  # a different gradient for every cell
    fast = nb_nll_per_cell(x, mu, theta)
    dense = -log_nb(x, mu, theta).sum(-1)
    assert torch.allclose(fast, dense, atol=1e-9)
    fast_grads = torch.autograd.grad((fast * weights).sum(), (mu, theta))
    dense_grads = torch.autograd.grad((dense * weights).sum(), (mu, theta))
    for a, b in zip(fast_grads, dense_grads, strict=True):
        assert torch.allclose(a, b, atol=1e-9)
    every = torch.arange(x.numel())
    with_zeros = torch.sparse_csr_tensor(torch.arange(0, x.numel() + 1, 30), every % 30, x.reshape(-1), x.shape)
    for csr in (x.to_sparse_csr(), with_zeros):  # read at its stored entries, explicit zeros included
        from_csr = nb_nll_per_cell(csr, mu, theta)
        assert torch.allclose(from_csr, dense, atol=1e-9)
        csr_grads = torch.autograd.grad((from_csr * weights).sum(), (mu, theta))
        for a, b in zip(csr_grads, dense_grads, strict=True):
            assert torch.allclose(a, b, atol=1e-9)
    superset = Entries(every, every // 30, every % 30)  # positions of zeros as well: they add nothing
    with pytest.raises(ValueError, match="stored entries"):  # a CSR's values pair with its own positions only
        nb_nll_per_cell(x.to_sparse_csr(), mu, theta, entries=superset)
    assert torch.allclose(nb_nll_per_cell(x, mu, theta, entries=superset), dense, atol=1e-9)
    assert torch.autograd.gradcheck(lambda m, t: nb_nll_per_cell(x, m, t), (mu, theta))
