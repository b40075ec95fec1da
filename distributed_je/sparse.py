"""Count matrices as torch sparse CSR tensors, and a linear layer that reads them without densifying.

On CPU the encoder's first layer costs B x G x H multiply-adds when dense; read at the
non-zeros (10% of a count matrix after gene selection, 3% of a thinned copy) it is a
weighted gather of weight rows: ``F.embedding_bag``.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
import scipy.sparse
import torch
import torch.nn.functional as F

# torch warns once that CSR support is "in beta"; the few operations used here are tested
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

# Above this share of non-zeros a dense matmul is as fast as the gather (measured on CPU:
# equal at 30%), so denser input stays dense.
MAX_SPARSE_DENSITY = 0.2


def nonzero_positions(x: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) positions of the non-zeros of a dense 2-D tensor, in increasing order."""
    flat = x.detach().contiguous().view(-1)
    if x.device.type == "cpu":  # numpy on a boolean mask: ~2.5x faster than torch's CPU nonzero
        return torch.from_numpy(np.flatnonzero(flat.numpy() != 0))
    return flat.nonzero().squeeze(1)


def repeat_positions(repeats: torch.Tensor) -> torch.Tensor:
    """Each position i of ``repeats`` (1-D, integer) ``repeats[i]`` times, in order: [0, 0, 2] for [2, 0, 1]."""
    if repeats.device.type == "cpu":  # numpy's repeat: ~3x faster than torch's CPU repeat_interleave
        return torch.from_numpy(np.repeat(np.arange(repeats.shape[0]), repeats.numpy()))
    return torch.repeat_interleave(torch.arange(repeats.shape[0], device=repeats.device), repeats)


def csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A sparse CSR tensor from parts this package built or wrote, valid by construction. Torch's
    invariant checks stay off, said explicitly: left implicit, torch warns in every process."""
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def csr_rows(crow: torch.Tensor) -> torch.Tensor:
    """The row of each stored entry of a CSR layout, in storage order, from its ``crow_indices``."""
    return repeat_positions(crow.diff())


class Entries(NamedTuple):
    """Where a count matrix's stored entries (CSR) or non-zeros (dense) lie, in row-major order:
    flat positions in the (n_rows, n_cols) grid, and the row and column of each."""

    flat: torch.Tensor
    rows: torch.Tensor
    cols: torch.Tensor


def stored_entries(x: torch.Tensor) -> Entries:
    """The ``Entries`` of a count matrix: a CSR tensor's stored entries in storage order (so they
    line up with its values), or a dense tensor's non-zeros."""
    n_cols = x.shape[1]
    if x.layout == torch.sparse_csr:
        rows, cols = csr_rows(x.crow_indices()), x.col_indices()
        return Entries(rows * n_cols + cols, rows, cols)
    flat = nonzero_positions(x)
    return Entries(flat, flat // n_cols, flat % n_cols)


def row_sums(x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
    """(n_rows, 1) sums of the rows of a dense or CSR matrix; ``rows``: a CSR's ``csr_rows``, if known."""
    if x.layout == torch.sparse_csr:
        rows = csr_rows(x.crow_indices()) if rows is None else rows
        sums = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        return sums.index_add_(0, rows, x.values())[:, None]
    return x.sum(1, keepdim=True)


def for_encoder(counts: torch.Tensor, nonzero: torch.Tensor | None = None) -> torch.Tensor:
    """``counts`` in the layout the encoder reads fastest: sparse CSR on CPU when at most
    MAX_SPARSE_DENSITY of the entries are non-zero, dense otherwise (and always on GPUs, whose
    dense matmuls win). ``nonzero``: the flat positions of a dense ``counts``' non-zeros, if known."""
    is_sparse = counts.layout == torch.sparse_csr
    if counts.device.type == "cpu":
        if not is_sparse and nonzero is None:
            nonzero = nonzero_positions(counts)
        n_stored = counts.values().shape[0] if is_sparse else nonzero.shape[0]
        if n_stored <= MAX_SPARSE_DENSITY * counts.shape[0] * counts.shape[1]:
            return counts if is_sparse else csr_from_dense(counts, nonzero)
    return counts.to_dense() if is_sparse else counts


def csr_from_dense(x: torch.Tensor, nonzero: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (dense, 2-D) as a sparse CSR tensor; ``nonzero``: its non-zeros' flat positions if known
    (a superset stores the extra positions as explicit zeros)."""
    if nonzero is None:
        nonzero = nonzero_positions(x)
    n_rows, n_cols = x.shape
    per_row = torch.bincount(nonzero // n_cols, minlength=n_rows)
    crow = F.pad(per_row.cumsum(0), (1, 0))
    return csr(crow, nonzero % n_cols, x.detach().reshape(-1).index_select(0, nonzero), x.shape)


def stack_rows(parts: list[torch.Tensor]) -> torch.Tensor:
    """Tensors of one layout (dense or CSR) with the same columns, one above the other."""
    if parts[0].layout != torch.sparse_csr:
        return torch.cat(parts)
    crows, start = [parts[0].crow_indices()[:1]], 0
    for part in parts:
        crows.append(part.crow_indices()[1:] + start)
        start += part.values().shape[0]
    shape = (sum(part.shape[0] for part in parts), parts[0].shape[1])
    return csr(torch.cat(crows), torch.cat([part.col_indices() for part in parts]),
               torch.cat([part.values() for part in parts]), shape)


def map_values(x: torch.Tensor, function) -> torch.Tensor:
    """``function`` applied to a CSR tensor's stored values (one that maps 0 to 0 keeps its meaning)."""
    return csr(x.crow_indices(), x.col_indices(), function(x.values()), x.shape)


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, extra: torch.Tensor | None, extra_weight: torch.Tensor | None,
                  bias: torch.Tensor) -> torch.Tensor:
    """``x.to_dense() @ weight + extra @ extra_weight + bias`` for a sparse CSR ``x``, without densifying.

    ``weight``: (n_columns of x, n_out), the layout ``embedding_bag`` gathers rows from;
    ``extra``: dense columns after x's (the batch one-hot) with their (n_extra, n_out)
    ``extra_weight``, or both None. Gradients flow to the weights and the bias, not to the
    inputs (data).
    """
    return _SparseLinear.apply(x.crow_indices(), x.col_indices(), x.values(), weight, extra, extra_weight, bias)


class _SparseLinear(torch.autograd.Function):
    """out = x @ W + extra @ W_extra + b with x in CSR (crow, col, values) and W (n_in, n_out).

    Forward gathers the weight rows of each row's non-zeros (``embedding_bag``); backward does
    the same by column: the gradient of weight row j is the sum of value * grad_out[row] over
    column j's non-zeros, in CSC order. W's layout is the one both read, so neither copies it.
    """

    @staticmethod
    def forward(ctx, crow, col, values, weight, extra, extra_weight, bias):
        out = F.embedding_bag(col, weight, crow, mode="sum", per_sample_weights=values, include_last_offset=True)
        if extra is not None:
            out = torch.addmm(out, extra, extra_weight)
        ctx.save_for_backward(crow, col, values, extra)
        ctx.n_in = weight.shape[0]
        return out + bias

    @staticmethod
    def backward(ctx, grad):
        crow, col, values, extra = ctx.saved_tensors
        # CSC order by scipy's counting sort: one O(nnz) pass, half the time of an argsort of the
        # columns plus gathers (the layer is sparse on CPU only)
        by_column = scipy.sparse.csr_array((values.numpy(), col.numpy(), crow.numpy()),
                                           shape=(grad.shape[0], ctx.n_in)).tocsc()
        grad_weight = F.embedding_bag(torch.from_numpy(by_column.indices), grad, torch.from_numpy(by_column.indptr),
                                      mode="sum", per_sample_weights=torch.from_numpy(by_column.data),
                                      include_last_offset=True)
        grad_extra_weight = None if extra is None else extra.t() @ grad
        return None, None, None, grad_weight, None, grad_extra_weight, grad.sum(0)
