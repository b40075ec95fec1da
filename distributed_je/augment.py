"""Binomial thinning: the augmentation that makes a low-depth view of a cell."""

from __future__ import annotations

import numpy as np
import torch

from distributed_je.sparse import csr_rows, drop_zeros, nonzero_positions

# Entries of up to this many UMIs (~95% of a count matrix's non-zeros) draw from per-cell CDF
# tables; 8 thresholds compared give 8 booleans, one uint64.
TABLED_COUNT = 8


def binomial_thin(x: torch.Tensor, p: torch.Tensor, *, generator: torch.Generator | None = None,
                  nonzero: torch.Tensor | None = None) -> torch.Tensor:
    """Draw y* ~ Binomial(y, p) elementwise, with one success probability per cell.

    ``x`` holds counts, dense (n_cells, n_genes) or a sparse CSR tensor (the result then stores
    only its own non-zeros); ``p`` has shape (n_cells,) or (n_cells, 1). Only the non-zeros are
    drawn, in row-major order, so a dense and a sparse copy of the same counts give the same
    draw from the same generator.
    ``nonzero``: the flat positions of a dense ``x``'s non-zeros in increasing order, if already
    known (a superset is fine).
    """
    n_cells = x.shape[0]
    p = p.reshape(-1).to(dtype=x.dtype, device=x.device)
    if p.shape[0] != n_cells:
        raise ValueError(f"p has {p.shape[0]} entries for {n_cells} cells: expected one per cell")
    if bool(((p < 0) | (p > 1)).any()):
        raise ValueError("p must lie in [0, 1] for every cell")
    if x.layout == torch.sparse_csr:
        values = _draw(x.values(), csr_rows(x.crow_indices()), p, generator)
        return drop_zeros(torch.sparse_csr_tensor(x.crow_indices(), x.col_indices(), values, x.shape))
    if x.layout != torch.strided:
        raise ValueError(f"binomial_thin takes dense or sparse CSR counts, got layout {x.layout}")
    positions = nonzero_positions(x) if nonzero is None else nonzero
    drawn = _draw(x.reshape(-1).index_select(0, positions), positions // x.shape[1], p, generator)
    return torch.zeros_like(x).view(-1).index_copy_(0, positions, drawn).view(x.shape)


def _draw(counts: torch.Tensor, rows: torch.Tensor, p: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Binomial(counts, p[rows]) for a count matrix's stored entries (``rows``: each entry's cell).

    On GPUs this is torch.binomial. On CPU, where that costs ~80 ns a draw, the few UMIs per
    entry of count data allow cheaper exact draws, one uniform u per entry: an entry of 1 UMI
    (~70% of them) is kept if u < p; one of 2 to TABLED_COUNT UMIs is X = #{j : u > P(X <= j)},
    its thresholds looked up in a per-cell table (each cell has one p); larger entries use
    numpy's binomial. The numpy generator is seeded from ``generator``. Entries of 0 draw
    nothing and take no random numbers, so explicitly stored zeros leave the other draws unchanged.
    """
    if counts.device.type != "cpu":
        return torch.binomial(counts.float(), p.index_select(0, rows).float(), generator=generator).to(counts.dtype)
    rng = np.random.default_rng(int(torch.randint(2**62, (), generator=generator)))
    n, cells, p_cell = counts.numpy(), rows.numpy(), p.double().numpy()
    drawn = np.zeros_like(n)
    single = np.flatnonzero(n == 1)
    drawn[single] = rng.random(len(single)) < p_cell[cells[single]]
    tabled = np.flatnonzero((n > 1) & (n <= TABLED_COUNT))
    table = _binomial_cdf_table(p_cell).reshape(-1, TABLED_COUNT)  # row cell * (TABLED_COUNT + 1) + n
    above = rng.random(len(tabled))[:, None] > table[cells[tabled] * (TABLED_COUNT + 1) + n[tabled].astype(np.int64)]
    # the TABLED_COUNT booleans of an entry as the bytes of one uint64: the top byte of x * 0x0101... sums them
    drawn[tabled] = (above.view(np.uint64)[:, 0] * np.uint64(0x0101010101010101)) >> np.uint64(56)
    large = np.flatnonzero(n > TABLED_COUNT)
    drawn[large] = rng.binomial(n[large].astype(np.int64), p_cell[cells[large]])
    return torch.from_numpy(drawn)


def _binomial_cdf_table(p: np.ndarray) -> np.ndarray:
    """(cells, TABLED_COUNT + 1, TABLED_COUNT): P(X <= j) for X ~ Binomial(n, p[cell]) at [cell, n, j],
    and 2 (above any uniform) where j >= n, so that row n has exactly n thresholds."""
    cdf = np.ones((TABLED_COUNT + 1, TABLED_COUNT, len(p)))  # [n, j, cell]; n = 0 keeps nothing
    for n in range(1, TABLED_COUNT + 1):  # Pascal's rule: the n-th UMI is lost (1 - p) or kept (p)
        cdf[n] = (1.0 - p) * cdf[n - 1]
        cdf[n, 1:] += p * cdf[n - 1, :-1]
    below = np.arange(TABLED_COUNT) < np.arange(TABLED_COUNT + 1)[:, None]  # j < n
    return np.where(below[None], cdf.transpose(2, 0, 1), 2.0)


def sample_thinning_probability(library: torch.Tensor, min_library_size: float, *,
                                generator: torch.Generator | None = None) -> torch.Tensor:
    """Per cell, p = L*/L with a target library L* drawn log-uniformly in [min_library_size, L].

    ``library`` has shape (n_cells, 1) or (n_cells,); the result has the same shape. A cell
    whose library is already at or below ``min_library_size`` keeps p = 1.
    """
    library = library.float().clamp(min=1.0)
    low, high = library.clamp(max=max(min_library_size, 1.0)).log(), library.log()
    u = torch.rand(library.shape, generator=generator, device=library.device)
    return (torch.lerp(low, high, u).exp() / library).clamp(max=1.0)
