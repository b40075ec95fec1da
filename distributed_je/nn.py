"""Networks of the SCVI architecture (as scvi-tools' SCVI defines it); no losses, no training."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from distributed_je.sparse import for_encoder, map_values, sparse_linear

VAR_EPS = 1e-4  # floor of the posterior variance, as in scvi-tools


class BatchLinear(nn.Module):
    """``x @ weight + batch_one_hot @ batch_weight + bias``: scvi-tools' linear layer over x
    joined with the batch one-hot, without the join. The weights are stored (n_in, n_out):
    ``sparse_linear`` reads a sparse CSR x at its non-zeros straight from that layout, and a
    dense x takes one matmul."""

    def __init__(self, n_in: int, n_out: int, n_batches: int) -> None:
        super().__init__()
        bound = 1 / math.sqrt(n_in + n_batches)  # nn.Linear's initialisation, over the joint input

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter(torch.empty(*shape).uniform_(-bound, bound))

        self.weight = uniform(n_in, n_out)
        self.batch_weight = uniform(n_batches, n_out) if n_batches else None
        self.bias = uniform(n_out)

    def forward(self, x: torch.Tensor, batch_one_hot: torch.Tensor | None) -> torch.Tensor:
        """``x``: dense or sparse CSR (n_cells, n_in); ``batch_one_hot``: (n_cells, n_batches), or None
        without batches."""
        one_hot = batch_one_hot if self.batch_weight is not None else None
        if x.layout == torch.sparse_csr:
            return sparse_linear(x, self.weight, one_hot, self.batch_weight, self.bias)
        out = torch.addmm(self.bias, x, self.weight)
        return out if one_hot is None else torch.addmm(out, one_hot, self.batch_weight)


class Dropout(nn.Module):
    """nn.Dropout drawing from a generator passed in (seeded from seed, rank and epoch) rather than
    torch's global one; its uniforms and compare are also ~2x faster on CPU than bernoulli_."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.training or self.rate == 0:
            return x
        # float32 uniforms under autocast too: bf16's would round the keep probability
        uniforms = torch.rand(x.shape, generator=generator, device=x.device)
        return x * ((uniforms >= self.rate).to(x.dtype) / (1 - self.rate))


class FCLayers(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout, repeated; the batch one-hot joins every layer's input."""

    def __init__(self, n_in: int, n_out: int, *, n_batches: int, n_layers: int, dropout_rate: float) -> None:
        super().__init__()
        sizes = [n_in] + [n_out] * n_layers
        self.layers = nn.ModuleList(
            nn.Sequential(
                BatchLinear(n_from, n_to, n_batches),
                # momentum and eps as in scvi-tools, which the parity benchmark compares against
                nn.BatchNorm1d(n_to, momentum=0.01, eps=1e-3),
                nn.ReLU(),
                Dropout(dropout_rate),
            )
            for n_from, n_to in zip(sizes[:-1], sizes[1:])
        )

    def forward(self, x: torch.Tensor, batch_one_hot: torch.Tensor | None, n_views: int = 1,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """``x``: dense, or sparse CSR (read at its non-zeros by the first layer). Its rows may be
        ``n_views`` views of the same cells stacked: one matmul for all, BatchNorm per view, so
        the result equals one call per view. ``generator``: dropout's, in training."""
        for linear, norm, relu, dropout in self.layers:
            x = linear(x, batch_one_hot)
            x = norm(x) if n_views == 1 else torch.cat([norm(view) for view in x.chunk(n_views)])
            x = dropout(relu(x), generator)
        return x


class Encoder(nn.Module):
    """q(z | x): a diagonal Normal from log1p counts (and, optionally, the batch)."""

    def __init__(self, n_genes: int, n_latent: int, *, n_hidden: int, n_layers: int, dropout_rate: float,
                 n_batches: int) -> None:
        super().__init__()
        self.body = FCLayers(n_genes, n_hidden, n_batches=n_batches, n_layers=n_layers, dropout_rate=dropout_rate)
        self.mean = nn.Linear(n_hidden, n_latent)
        self.log_var = nn.Linear(n_hidden, n_latent)

    def forward(self, counts: torch.Tensor, batch_one_hot: torch.Tensor | None, n_views: int = 1,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``counts``: dense or sparse CSR, possibly ``n_views`` stacked views (see FCLayers)."""
        counts = for_encoder(counts)
        if counts.layout == torch.sparse_csr:
            log_counts = map_values(counts, torch.log1p)  # log1p(0) = 0: the non-zeros stay where they are
        else:
            log_counts = torch.log1p(counts)
        h = self.body(log_counts, batch_one_hot, n_views, generator)
        # float32 out of any autocast region: the KL and the likelihood need the precision
        return self.mean(h).float(), torch.exp(self.log_var(h).float()) + VAR_EPS


class Decoder(nn.Module):
    """p(x | z, library, batch): softmax gene proportions times the observed library size."""

    def __init__(self, n_latent: int, n_genes: int, *, n_hidden: int, n_layers: int, n_batches: int,
                 dispersion: str, zero_inflated: bool) -> None:
        super().__init__()
        self.body = FCLayers(n_latent, n_hidden, n_batches=n_batches, n_layers=n_layers, dropout_rate=0.0)
        self.scale = nn.Linear(n_hidden, n_genes)
        # only where used: DDP fails on parameters that get no gradient
        self.zi_logits = nn.Linear(n_hidden, n_genes) if zero_inflated else None
        n_dispersions = n_batches if dispersion == "gene-batch" else 1
        self.log_theta = nn.Parameter(torch.randn(n_dispersions, n_genes))

    def forward(self, z: torch.Tensor, library: torch.Tensor, batch_index: torch.Tensor | None,
                batch_one_hot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return the NB mean (n_cells, n_genes), inverse dispersion and zero-inflation logits (or None)."""
        h = self.body(z, batch_one_hot)
        mu = library * F.softmax(self.scale(h), dim=-1)
        # per-gene dispersion stays (1, n_genes) and broadcasts: lgamma(theta) is then taken once
        # per gene, not once per cell and gene
        theta = torch.exp(self.log_theta)
        if theta.shape[0] > 1:
            theta = theta[batch_index]
        return mu, theta, None if self.zi_logits is None else self.zi_logits(h)
