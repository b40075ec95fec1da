import pytest
import torch
import torch.nn.functional as F

from distributed_je import sparse
from distributed_je.sparse import (csr_from_dense, csr_rows, for_encoder, nonzero_positions, row_sums,
                                   sparse_linear, stack_rows, stored_entries)


def sparse_counts(n_cells=40, n_genes=300, density=0.08, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(n_cells, n_genes, generator=g) < density
    return (mask * torch.randint(1, 30, (n_cells, n_genes), generator=g)).to(dtype)


def test_csr_from_dense_round_trips_and_a_superset_stores_explicit_zeros():
    x = sparse_counts()
    x[3] = 0  # an empty row
    exact = csr_from_dense(x)
    assert exact.values().shape[0] == int((x != 0).sum())
    assert torch.equal(exact.to_dense(), x)
    superset = csr_from_dense(x, torch.arange(x.numel()))
    assert superset.values().shape[0] == x.numel()
    assert torch.equal(superset.to_dense(), x)


def test_nonzero_positions_are_flat_and_increasing():
    x = sparse_counts()
    positions = nonzero_positions(x)
    assert torch.equal(positions, x.reshape(-1).nonzero().squeeze(1))


@pytest.mark.parametrize("layout", ["dense", "csr"])
def test_stack_rows_is_cat(layout):
    a, b = sparse_counts(seed=1), sparse_counts(n_cells=7, seed=2)
    parts = [a, b] if layout == "dense" else [csr_from_dense(a), csr_from_dense(b)]
    assert torch.equal(stack_rows(parts).to_dense(), torch.cat([a, b]))


def test_for_encoder_keeps_sparse_counts_sparse_and_dense_ones_dense():
    thin = sparse_counts(density=0.05)
    assert for_encoder(thin).layout == torch.sparse_csr
    assert torch.equal(for_encoder(thin).to_dense(), thin)
    crowded = sparse_counts(density=2 * sparse.MAX_SPARSE_DENSITY)
    assert for_encoder(crowded).layout == torch.strided
    assert for_encoder(csr_from_dense(crowded)).layout == torch.strided
    assert torch.equal(for_encoder(csr_from_dense(crowded)), crowded)


@pytest.mark.parametrize("n_extra", [0, 3])
def test_sparse_linear_matches_dense_linear_in_value_and_gradient(n_extra):
    x = torch.log1p(sparse_counts())
    x[5] = 0
    extra = F.one_hot(torch.arange(x.shape[0]) % 3, 3).float() if n_extra else None
    linear = torch.nn.Linear(x.shape[1] + n_extra, 16)
    upstream = torch.randn(x.shape[0], 16)

    dense_in = x if extra is None else torch.cat([x, extra], 1)
    (linear(dense_in) * upstream).sum().backward()
    expected = linear(dense_in).detach()
    expected_grad = linear.weight.grad.t()  # (n_in, n_out), the layout sparse_linear takes

    weight = linear.weight.detach().t()[:x.shape[1]].clone().requires_grad_()
    extra_weight = linear.weight.detach().t()[x.shape[1]:].clone().requires_grad_() if n_extra else None
    bias = linear.bias.detach().clone().requires_grad_()
    out = sparse_linear(csr_from_dense(x), weight, extra, extra_weight, bias)
    (out * upstream).sum().backward()
    torch.testing.assert_close(out.detach(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weight.grad, expected_grad[:x.shape[1]], rtol=1e-5, atol=1e-5)
    if n_extra:
        torch.testing.assert_close(extra_weight.grad, expected_grad[x.shape[1]:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bias.grad, linear.bias.grad, rtol=1e-5, atol=1e-5)


def test_sparse_linear_gradcheck():
    x = csr_from_dense(sparse_counts(n_cells=6, n_genes=20, density=0.3, dtype=torch.float64))
    extra = F.one_hot(torch.arange(6) % 2, 2).double()
    weight, extra_weight = (torch.randn(n, 4, dtype=torch.float64, requires_grad=True) for n in (20, 2))
    bias = torch.randn(4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, e, b: sparse_linear(x, w, extra, e, b), (weight, extra_weight, bias))


def test_csr_rows_name_each_stored_entry_s_row():
    crow = torch.tensor([0, 2, 2, 5, 6], dtype=torch.int32)  # row 1 is empty
    assert torch.equal(csr_rows(crow), torch.tensor([0, 0, 2, 2, 2, 3]))


def test_row_sums_and_stored_entries_of_csr_match_dense():
    x = sparse_counts()
    x[3] = 0  # an empty row
    csr = x.to_sparse_csr()
    torch.testing.assert_close(row_sums(csr), x.sum(1, keepdim=True))
    entries = stored_entries(csr)
    assert torch.equal(entries.flat, nonzero_positions(x))
    assert torch.equal(x.reshape(-1)[entries.flat], csr.values())
    assert torch.equal(x[entries.rows, entries.cols], csr.values())
    for a, b in zip(stored_entries(x), entries, strict=True):  # a dense matrix's non-zeros: the same entries
        assert torch.equal(a, b)
    torch.testing.assert_close(row_sums(csr, entries.rows), x.sum(1, keepdim=True))
