"""Count likelihoods: log-probabilities of observed counts, pure functions over tensors.

Parameterisation as in scvi-tools: mean ``mu`` and inverse dispersion ``theta`` for the
negative binomial (variance mu + mu**2 / theta); ``zi_logits`` are the logits of the
zero-inflation probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from distributed_je.sparse import Entries, nonzero_positions, stored_entries

EPS = 1e-8  # keeps log() finite where a rate underflows to zero
# Counts up to this take the NB's count terms from per-gene tables (_CountTerms): 97% of
# pbmc3k's non-zeros over 2,000 genes
TABLED_COUNT = 16


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    log_theta_mu = torch.log(theta + mu + EPS)
    return (
        theta * (torch.log(theta + EPS) - log_theta_mu)
        + x * (torch.log(mu + EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def nb_nll_per_cell(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor,
                    entries: Entries | None = None) -> torch.Tensor:
    """-sum over genes of log_nb, per cell: shape (n_cells,). Equal to ``-log_nb(...).sum(-1)``.

    ``x``: dense, or sparse CSR (read at its stored entries, never densified). ``theta`` is
    (1, n_genes) or (n_cells, n_genes). ``entries``: ``stored_entries(x)`` if already known;
    for a dense ``x``, entries covering a superset of its non-zeros are fine (a zero adds
    nothing to the terms taken there). Computed in float32 at least, outside any autocast region.
    """
    if entries is None:
        entries = stored_entries(x)
    if x.layout == torch.sparse_csr:
        counts = x.values()
        if entries.flat.shape[0] != counts.shape[0]:  # a superset would pair positions with the wrong values
            raise ValueError(f"entries has {entries.flat.shape[0]} positions for a CSR x with {counts.shape[0]} "
                             "stored entries: pass its stored_entries, or None")
    else:
        counts = x.reshape(-1).index_select(0, entries.flat)
    dtype = torch.promote_types(mu.dtype, torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        return _NBNegLogLikelihood.apply(counts.to(dtype), mu.to(dtype), theta.to(dtype), entries)


class _CountTerms:
    """lgamma(x + theta) - lgamma(theta) - lgamma(x + 1) at a count matrix's non-zeros, and its
    derivative in theta, digamma(x + theta) - digamma(theta), for integer counts x.

    For a count up to TABLED_COUNT and a per-gene theta both are sums over j < x, of
    log((theta + j) / (j + 1)) and of 1 / (theta + j): one small table per gene, cumulative
    sums over (n_genes, TABLED_COUNT), read by (gene, count). That replaces two lgamma and one
    digamma per non-zero, which are 5-20x dearer than a log; larger counts take them directly.
    """

    def __init__(self, counts: torch.Tensor, theta: torch.Tensor, entries: Entries) -> None:
        self.counts, self.theta = counts, theta.detach()  # on ctx, not saved: no autograd reference
        self.per_gene = theta.shape[0] == 1
        if self.per_gene:
            self.theta_nz = None
            self.large = nonzero_positions(counts > TABLED_COUNT)
            self.large_theta = self.theta.reshape(-1).index_select(0, entries.cols.index_select(0, self.large))
            width = TABLED_COUNT + 1  # count 0 (an explicitly stored zero) has column 0, all terms 0
            self.index = entries.cols * width + counts.clamp(max=TABLED_COUNT).long()
        else:
            self.theta_nz = theta.reshape(-1).index_select(0, entries.flat)

    def value(self) -> torch.Tensor:
        if not self.per_gene:
            return _lgamma_terms(self.counts, self.theta_nz)
        return self._tabled(lambda theta, j: torch.log((theta + j) / (j + 1)), _lgamma_terms)

    def theta_derivative(self) -> torch.Tensor:
        if not self.per_gene:
            return _digamma_terms(self.counts, self.theta_nz)
        return self._tabled(lambda theta, j: 1 / (theta + j), _digamma_terms)

    def _tabled(self, step, exact) -> torch.Tensor:
        """Per non-zero, the sum over j < x of ``step(theta, j)`` for its gene's theta, from the
        gene's cumulative sums over j < TABLED_COUNT; counts above that take ``exact(x, theta)``."""
        j = torch.arange(TABLED_COUNT, device=self.counts.device, dtype=self.counts.dtype)
        sums = F.pad(step(self.theta.reshape(-1, 1), j).cumsum(1), (1, 0))  # (n_genes, TABLED_COUNT + 1)
        terms = sums.view(-1).index_select(0, self.index)
        return terms.index_copy_(0, self.large, exact(self.counts.index_select(0, self.large), self.large_theta))


def _lgamma_terms(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.lgamma(x + theta) - torch.lgamma(theta) - torch.lgamma(x + 1)


def _digamma_terms(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    return torch.digamma(x + theta) - torch.digamma(theta)


class _NBNegLogLikelihood(torch.autograd.Function):
    """The NB negative log-likelihood per cell with a hand-written backward.

    Every term but theta * log(theta / (theta + mu)) vanishes where x = 0, which is most of a
    count matrix (75-90% after gene selection), so the others are taken at the non-zeros only.
    Autograd would make ~20 passes over the dense (cells, genes) grid; this makes 2 forward
    and 3 backward, plus matrix-vector products.
    """

    @staticmethod
    def forward(ctx, counts: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, entries: Entries
                ) -> torch.Tensor:
        """``counts``: the counts at ``entries``."""
        total = mu + (theta + EPS)  # (n_cells, n_genes): theta + mu
        log_total = torch.log(total)
        theta_log_theta = theta * torch.log(theta + EPS)
        if theta.shape[0] == 1:  # per gene
            dense = theta_log_theta.sum() - log_total @ theta.reshape(-1)
        else:
            dense = (theta_log_theta - theta * log_total).sum(-1)
        count_terms = _CountTerms(counts, theta, entries)
        mu_nz = mu.reshape(-1).index_select(0, entries.flat)
        sparse = counts * (torch.log(mu_nz + EPS) - log_total.reshape(-1).index_select(0, entries.flat)) \
            + count_terms.value()
        ctx.save_for_backward(theta, total, log_total, counts, mu_nz)
        ctx.entries, ctx.count_terms = entries, count_terms
        return -(dense + torch.zeros_like(dense).index_add(0, entries.rows, sparse))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # grad: (n_cells,)
        theta, total, log_total, counts, mu_nz = ctx.saved_tensors
        entries = ctx.entries
        grad_nz = grad.index_select(0, entries.rows)
        theta_over_total = theta / total  # d/dmu of the dense term
        counts_over_total = counts / total.reshape(-1).index_select(0, entries.flat)
        grad_mu = grad_theta = None
        if ctx.needs_input_grad[1]:
            grad_mu = theta_over_total * grad[:, None]  # (theta + x) / (theta + mu) - x / mu, dense part
            grad_mu.view(-1).index_add_(0, entries.flat, grad_nz * (counts_over_total - counts / (mu_nz + EPS)))
        if ctx.needs_input_grad[2]:
            # dense: log(theta + mu) + theta / (theta + mu) - log(theta) - 1; at non-zeros: x / (theta + mu)
            # - digamma(x + theta) + digamma(theta)
            d_theta_log_theta = torch.log(theta + EPS) + theta / (theta + EPS)
            at_nonzeros = grad_nz * (counts_over_total - ctx.count_terms.theta_derivative())
            if theta.shape[0] == 1:
                grad_theta = grad @ log_total + grad @ theta_over_total - grad.sum() * d_theta_log_theta.reshape(-1)
                grad_theta = grad_theta.index_add(0, entries.cols, at_nonzeros).reshape(theta.shape)
            else:
                grad_theta = (log_total + theta_over_total - d_theta_log_theta) * grad[:, None]
                grad_theta.view(-1).index_add_(0, entries.flat, at_nonzeros)
        return None, grad_mu, grad_theta, None


def log_zinb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    log_pi = -F.softplus(-zi_logits)  # log P(structural zero)
    log_not_pi = -F.softplus(zi_logits)
    nb = log_nb(x, mu, theta)
    zero = torch.logaddexp(log_pi, log_not_pi + nb)
    return torch.where(x < 0.5, zero, log_not_pi + nb)


def log_poisson(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return x * torch.log(mu + EPS) - mu - torch.lgamma(x + 1)


def reconstruction_nll(likelihood: str, x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor,
                       zi_logits: torch.Tensor | None = None, entries: Entries | None = None) -> torch.Tensor:
    """Negative log-likelihood of each cell's counts, summed over genes: shape (n_cells,).

    ``entries``: ``stored_entries(x)``, if known (see nb_nll_per_cell).
    """
    if likelihood == "nb":
        return nb_nll_per_cell(x, mu, theta, entries)
    if x.layout == torch.sparse_csr:
        x = x.to_dense()
    return -log_likelihood(likelihood, x, mu, theta, zi_logits).sum(-1)


def log_likelihood(likelihood: str, x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor,
                   zi_logits: torch.Tensor | None = None) -> torch.Tensor:
    """Elementwise log p(x) under ``likelihood`` in {"nb", "zinb", "poisson"}."""
    if likelihood == "nb":
        return log_nb(x, mu, theta)
    if likelihood == "zinb":
        return log_zinb(x, mu, theta, zi_logits)
    if likelihood == "poisson":
        return log_poisson(x, mu)
    raise ValueError(f"likelihood={likelihood!r} is not allowed: choose one of nb, zinb, poisson")


def kl_normal_standard(mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, var) || N(0, I)) per cell, summed over latent dimensions: shape (n_cells,)."""
    return 0.5 * (mean.pow(2) + var - torch.log(var) - 1.0).sum(-1)
