import numpy as np
import pytest
import torch

from distributed_je import augment
from distributed_je.augment import MAX_SUMMED_COUNT, binomial_thin, sample_thinning_probability, thin_to_random_depth
from distributed_je.sparse import Entries


@pytest.fixture(params=["numpy", "torch"])
def draw(request, monkeypatch):
    """Each implementation of the draw: numpy (what CPUs run) and torch (what GPUs run, here on CPU)."""
    if request.param == "torch":
        monkeypatch.setattr(augment, "_draw", augment._draw_torch)
    return request.param


def counts(n_cells=50, n_genes=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.poisson(torch.rand(n_cells, n_genes, generator=g) * 5, generator=g)
    x[x == 2] = 0  # sparse-looking, and 1s as in real counts
    return x


def test_thinned_counts_are_integers_not_above_the_original():
    x = counts()
    y = binomial_thin(x, torch.full((x.shape[0],), 0.3), generator=torch.Generator().manual_seed(1))
    assert torch.equal(y, y.round())
    assert (y <= x).all() and (y >= 0).all()
    assert y.sum() < x.sum()


def test_mean_of_many_draws_is_p_times_counts(draw):
    x = counts(n_cells=4, n_genes=10)
    p = torch.tensor([0.1, 0.5, 0.9, 0.25])
    g = torch.Generator().manual_seed(2)
    draws = torch.stack([binomial_thin(x, p, generator=g) for _ in range(4000)])
    expected = p[:, None] * x
    standard_error = (x * p[:, None] * (1 - p[:, None]) / len(draws)).sqrt()
    assert ((draws.mean(0) - expected).abs() <= 5 * standard_error + 1e-6).all()


def test_same_seed_same_draw_other_seed_other_draw(draw):
    x, p = counts(), torch.full((50, 1), 0.5)
    a = binomial_thin(x, p, generator=torch.Generator().manual_seed(7))
    b = binomial_thin(x, p, generator=torch.Generator().manual_seed(7))
    c = binomial_thin(x, p, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_p_one_is_identity_and_p_zero_gives_zeros(draw):
    x = counts()
    assert torch.equal(binomial_thin(x, torch.ones(50)), x)
    assert torch.equal(binomial_thin(x, torch.zeros(50)), torch.zeros_like(x))


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])  # the loader's CSR batches: int32
def test_sparse_and_dense_inputs_give_the_same_draw(index_dtype, draw):
    x, p = counts(), torch.linspace(0.05, 0.95, 50)
    dense = binomial_thin(x, p, generator=torch.Generator().manual_seed(3))
    csr = x.to_sparse_csr()
    csr = torch.sparse_csr_tensor(csr.crow_indices().to(index_dtype), csr.col_indices().to(index_dtype),
                                  csr.values(), x.shape)
    sparse = binomial_thin(csr, p, generator=torch.Generator().manual_seed(3))
    assert sparse.layout == torch.sparse_csr
    assert sparse.crow_indices().dtype == sparse.col_indices().dtype == index_dtype
    assert (sparse.values() != 0).all()  # only its own non-zeros are stored
    assert torch.equal(sparse.to_dense(), dense)


def test_bad_probabilities_are_refused():
    x = counts()
    with pytest.raises(ValueError, match="one per cell"):
        binomial_thin(x, torch.full((3,), 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        binomial_thin(x, torch.full((50,), 1.5))


def test_thinning_probability_is_log_uniform_between_min_library_and_library():
    library = torch.full((20000, 1), 10000.0)
    p = sample_thinning_probability(library, 10.0, generator=torch.Generator().manual_seed(0))
    target = p * library
    assert target.min() >= 10.0 - 1e-3 and target.max() <= 10000.0 + 1e-2
    # log-uniform on [10, 10^4]: log10 of the target is uniform on [1, 4]
    log_target = torch.log10(target)
    assert abs(log_target.mean().item() - 2.5) < 0.03
    assert abs((log_target < 2.0).float().mean().item() - 1 / 3) < 0.02


def test_cells_below_min_library_are_not_thinned():
    p = sample_thinning_probability(torch.tensor([[3.0], [0.0], [10.0]]), 10.0)
    assert torch.equal(p, torch.ones(3, 1))


def test_thinning_refuses_a_layout_other_than_dense_or_csr():
    x = counts().to_sparse()  # COO
    with pytest.raises(ValueError, match="dense or sparse CSR, got layout torch.sparse_coo"):
        binomial_thin(x, torch.full((50,), 0.5))
    with pytest.raises(ValueError, match="dense or sparse CSR, got layout torch.sparse_coo"):
        thin_to_random_depth(x, torch.full((50, 1), 100.0), 10.0)


def test_thinning_to_random_depth_draws_log_uniform_depths():
    x = torch.full((20000, 1), 10000.0)  # one gene: the thinned count is the cell's new depth
    target = thin_to_random_depth(x, x, 10.0, generator=torch.Generator().manual_seed(0))
    assert target.min() >= 1 and target.max() <= 10000
    log_target = torch.log10(target)  # uniform on [1, 4], up to the binomial's spread around p L
    assert abs(log_target.mean().item() - 2.5) < 0.03
    assert abs((log_target < 2.0).float().mean().item() - 1 / 3) < 0.02


def test_thinning_to_random_depth_leaves_cells_at_or_below_the_minimum_and_is_seeded():
    x = counts(n_cells=6)
    x[:3] = 0
    x[0, :3], x[1, 0] = torch.tensor([1.0, 1.0, 1.0]), 10.0  # libraries 3, 10 and 0
    library = x.sum(1, keepdim=True)

    def thin(counts, seed):
        return thin_to_random_depth(counts, library, 10.0, generator=torch.Generator().manual_seed(seed))

    dense = thin(x, 1)
    assert torch.equal(dense[:3], x[:3])
    assert (dense[3:] <= x[3:]).all() and dense[3:].sum() < x[3:].sum()
    assert torch.equal(thin(x.to_sparse_csr(), 1).to_dense(), dense)
    assert not torch.equal(thin(x, 2), dense)


@pytest.mark.parametrize("count", [1, 3, 8, 9, 64, 500])
def test_draws_have_the_binomial_mean_and_variance(count, draw):
    x = torch.full((200, 50), float(count))
    p = torch.linspace(0.05, 0.95, 200)
    y = binomial_thin(x, p, generator=torch.Generator().manual_seed(3))
    n = x.shape[1]
    mean, var = y.mean(1), y.var(1)
    expected_mean, expected_var = count * p, count * p * (1 - p)
    assert ((mean - expected_mean).abs() <= 5 * (expected_var / n).sqrt() + 1e-6).all()
    # a sample variance errs by a first-order term (its standard error, from the binomial's fourth
    # central moment) plus the squared error of the mean, at most (5 standard errors)^2
    fourth_moment = expected_var * (1 + 3 * (count - 2) * p * (1 - p))
    var_se = ((fourth_moment - expected_var**2 * (n - 3) / (n - 1)) / n).sqrt()
    assert ((var - expected_var).abs() <= 5 * var_se + 25 * expected_var / n + 1e-6).all()


def test_superset_of_positions_gives_the_same_draw():
    x, p = counts(), torch.rand(50)
    exact = binomial_thin(x, p, generator=torch.Generator().manual_seed(4))
    every = torch.arange(x.numel())
    superset = binomial_thin(x, p, generator=torch.Generator().manual_seed(4),
                             entries=Entries(every, every // x.shape[1], every % x.shape[1]))
    assert torch.equal(exact, superset)


# each of _draw's paths: one uniform (1), summed units (3, MAX_SUMMED_COUNT), a binomial draw (above)
@pytest.mark.parametrize("count", [1, 3, MAX_SUMMED_COUNT, MAX_SUMMED_COUNT + 4])
@pytest.mark.parametrize("p", [0.2, 0.7])
def test_draws_follow_the_binomial_pmf(p, count, draw):
    n_draws = 40000
    y = binomial_thin(torch.full((1, n_draws), float(count)), torch.tensor([p]),
                      generator=torch.Generator().manual_seed(5))
    frequencies = torch.bincount(y.long().reshape(-1), minlength=count + 1).double() / n_draws
    pmf = torch.distributions.Binomial(count, torch.tensor(p, dtype=torch.float64)).log_prob(
        torch.arange(count + 1, dtype=torch.float64)).exp()
    assert ((frequencies - pmf).abs() <= 5 * (pmf * (1 - pmf) / n_draws).sqrt() + 1e-4).all()


def test_explicitly_stored_zeros_leave_the_draw_unchanged(draw):
    x, p = counts(), torch.rand(50)
    exact = x.to_sparse_csr()
    with_zeros = torch.ones_like(x).to_sparse_csr()  # every position stored, zeros included
    with_zeros = torch.sparse_csr_tensor(with_zeros.crow_indices(), with_zeros.col_indices(), x.reshape(-1), x.shape)
    a = binomial_thin(exact, p, generator=torch.Generator().manual_seed(6))
    b = binomial_thin(with_zeros, p, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a.to_dense(), b.to_dense())


@pytest.mark.parametrize("n", [0, 1, 7])  # odd n: the last raw 64-bit draw is half used
def test_uniform_integers_come_n_at_a_time_as_uint32(n):
    values = augment._uniform_integers(np.random.default_rng(0), n)
    assert values.dtype == np.uint32 and values.shape == (n,)


def test_uniform_integers_are_uniform_below_two_to_the_31():
    n = 10_000
    values = augment._uniform_integers(np.random.default_rng(0), n)
    assert values.max() < 2**31
    # mean 2**30 with standard error 2**31 / sqrt(12 n); the top of the 31 bits set half the time
    assert abs(values.astype(np.float64).mean() - 2**30) < 5 * 2**31 / np.sqrt(12 * n)
    assert abs((values >= 2**30).mean() - 0.5) < 5 * 0.5 / np.sqrt(n)
