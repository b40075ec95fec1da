"""JE-SCVI: the SCVI VAE plus a cross-correlation loss between a cell and its thinned copy.

``forward`` returns the whole objective as one ``LossOutput``; the variants differ only in
which view the encoder sees and which terms are weighted in.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from distributed_je.augment import binomial_thin, thin_to_random_depth
from distributed_je.config import AugmentConfig, LossConfig, ModelConfig
from distributed_je.distributions import kl_normal_standard, reconstruction_nll
from distributed_je.keys import BATCH_INDEX, COUNTS
from distributed_je.losses import cross_correlation_loss
from distributed_je.nn import Decoder, Encoder
from distributed_je.sparse import for_encoder, row_sums, stack_rows, stored_entries


class LossOutput(NamedTuple):
    """Every term of the objective for one minibatch; all are means over its cells."""

    loss: torch.Tensor
    recon_nll: torch.Tensor  # reconstruction NLL per cell, summed over genes
    kl: torch.Tensor         # KL(q(z|x) || N(0, I)) per cell
    cco: torch.Tensor        # cross-correlation loss between z and z* (0 without JE)
    elbo: torch.Tensor       # recon_nll + kl: the negative ELBO per cell, with no weights


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """The weights a variant actually applies (the config's, with the variant's terms switched off)."""

    reconstruction: float
    je: float

    @classmethod
    def for_variant(cls, variant: str, loss: LossConfig) -> LossWeights:
        uses_je = variant in ("je", "je_only")
        reconstruction = 0.0 if variant == "je_only" else loss.reconstruction_weight
        return cls(reconstruction=reconstruction, je=loss.je_weight if uses_je else 0.0)


class JESCVI(nn.Module):
    def __init__(self, n_genes: int, n_batches: int, model: ModelConfig, loss: LossConfig,
                 augment: AugmentConfig) -> None:
        super().__init__()
        if n_genes < 1:
            raise ValueError(f"n_genes={n_genes} is not allowed: a model needs at least one gene")
        self.n_genes, self.n_batches = n_genes, max(n_batches, 1)
        self.model_config, self.loss_config, self.augment_config = model, loss, augment
        self.weights = LossWeights.for_variant(model.variant, loss)
        # A single batch carries no information, so (as in scvi-tools) it is not injected.
        n_injected = self.n_batches if self.n_batches > 1 else 0
        self.encoder = Encoder(
            n_genes, model.n_latent, n_hidden=model.n_hidden, n_layers=model.n_layers,
            dropout_rate=model.dropout_rate, n_batches=n_injected if model.encode_batch else 0,
        )
        self.decoder = Decoder(
            model.n_latent, n_genes, n_hidden=model.n_hidden, n_layers=model.n_layers,
            n_batches=n_injected, dispersion=model.dispersion, zero_inflated=model.likelihood == "zinb",
        )

    def _one_hot(self, batch_index: torch.Tensor | None, n_cells: int, device: torch.device) -> torch.Tensor:
        if batch_index is None:
            batch_index = torch.zeros(n_cells, dtype=torch.long, device=device)
        return F.one_hot(batch_index.long(), self.n_batches).float()

    def _sample(self, mean: torch.Tensor, var: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + var.sqrt() * noise

    def forward(self, batch: dict[str, torch.Tensor], *, kl_weight: float | None = None,
                generator: torch.Generator | None = None) -> LossOutput:
        """The objective on one minibatch; ``kl_weight`` defaults to the config's (no warm-up)."""
        counts = batch[COUNTS]  # dense, or CSR (on CPU: read at its non-zeros, never densified)
        batch_index = batch.get(BATCH_INDEX)
        one_hot = self._one_hot(batch_index, counts.shape[0], counts.device)
        entries = stored_entries(counts)  # also covers the thinned copy's non-zeros
        library = row_sums(counts, entries.rows)  # (n_cells, 1) UMIs
        view = for_encoder(counts, entries.flat)  # sparse on CPU: thinning and encoder read the non-zeros only
        variant = self.model_config.variant

        thinned = None
        if variant != "scvi":
            thinned = thin_to_random_depth(view, library, self.augment_config.min_library_size,
                                           generator=generator, entries=entries)
        if variant == "thinning_only":  # SCVI trained on thinned counts: the thinned copy is the cell
            counts, library, entries = thinned, row_sums(thinned), None
        # denoising encodes the thinned view but reconstructs the original counts, so the
        # decoder scales by the original library L: the target is y, whose depth is L.
        if variant in ("thinning_only", "denoising"):
            view = thinned

        if self.weights.je > 0:  # both views through the encoder at once, BatchNorm per view
            mean, var = self.encoder(stack_rows([view, thinned]), one_hot.repeat(2, 1), n_views=2,
                                     generator=generator)
            (q_mean, t_mean), (q_var, t_var) = mean.chunk(2), var.chunk(2)
        else:
            q_mean, q_var = self.encoder(view, one_hot, generator=generator)
        z = self._sample(q_mean, q_var, generator)

        mu, theta, zi_logits = self.decoder(z, library, batch_index, one_hot)
        recon_nll = reconstruction_nll(self.model_config.likelihood, counts, mu, theta, zi_logits, entries).mean()
        kl = kl_normal_standard(q_mean, q_var).mean()

        cco = torch.zeros((), device=counts.device)
        if self.weights.je > 0:
            if self.loss_config.je_latent == "mean":
                z_view, z_thin = q_mean, t_mean
            else:
                z_view, z_thin = z, self._sample(t_mean, t_var, generator)
            cco = cross_correlation_loss(
                z_view, z_thin, lambda_off_diag=self.loss_config.lambda_off_diag, gather=self.loss_config.gather_je,
            )

        kl_weight = self.loss_config.kl_weight if kl_weight is None else kl_weight
        loss = self.weights.reconstruction * recon_nll + kl_weight * kl + self.weights.je * cco
        return LossOutput(loss=loss, recon_nll=recon_nll.detach(), kl=kl.detach(), cco=cco.detach(),
                          elbo=(recon_nll + kl).detach())

    @torch.no_grad()
    def encode(self, counts: torch.Tensor, batch_index: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior means (n_cells, n_latent), in evaluation mode (running BatchNorm statistics)."""
        was_training = self.training
        self.eval()
        try:
            mean, _ = self.encoder(counts, self._one_hot(batch_index, counts.shape[0], counts.device))
        finally:
            self.train(was_training)
        return mean

    @torch.no_grad()
    def low_depth_scores(self, batch: dict[str, torch.Tensor], *, fraction: float, k: int,
                         generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Label-free scores of how well cells thinned to ``fraction`` of their depth keep their identity.

        Returns (low_depth_nll, knn_kept), means over the batch: the NLL of each cell's FULL counts
        decoded from the embedding of its thinned copy (a cell collapsed onto f(0) decodes to a
        generic profile and scores badly), and the share of its ``k`` nearest neighbours at full
        depth, within the batch, that stay among its ``k`` nearest after thinning. Neither
        contains a loss weight, so both can judge a search over the weights.
        """
        counts, batch_index = batch[COUNTS], batch.get(BATCH_INDEX)
        one_hot = self._one_hot(batch_index, counts.shape[0], counts.device)
        library = row_sums(counts)
        thinned = binomial_thin(counts, torch.full_like(library, fraction), generator=generator)
        was_training = self.training
        self.eval()
        try:
            full_mean, _ = self.encoder(counts, one_hot)
            thin_mean, _ = self.encoder(thinned, one_hot)
            mu, theta, zi_logits = self.decoder(thin_mean, library, batch_index, one_hot)
        finally:
            self.train(was_training)
        nll = reconstruction_nll(self.model_config.likelihood, counts, mu, theta, zi_logits).mean()
        return nll, neighbours_kept(full_mean.float(), thin_mean.float(), k)

    def bias_point(self, batch_index: int = 0) -> torch.Tensor:
        """f(0): the embedding of an all-zero cell, where low-count cells collapse. Shape (n_latent,)."""
        device = next(self.parameters()).device
        zeros = torch.zeros(1, self.n_genes, device=device)
        return self.encode(zeros, torch.tensor([batch_index], device=device))[0]


def neighbours_kept(reference: torch.Tensor, query: torch.Tensor, k: int) -> torch.Tensor:
    """Mean share of each row's ``k`` nearest rows in ``reference`` that are also among its ``k`` nearest
    in ``query`` (same rows, another embedding). NaN when there are not more than ``k`` rows."""
    n = reference.shape[0]
    if n <= k:
        return torch.full((), float("nan"), device=reference.device)

    def nearest(x: torch.Tensor) -> torch.Tensor:
        distances = torch.cdist(x, x)
        distances.fill_diagonal_(float("inf"))
        neighbours = torch.zeros(n, n, dtype=torch.bool, device=x.device)
        return neighbours.scatter_(1, distances.topk(k, largest=False).indices, True)

    return (nearest(reference) & nearest(query)).sum(1).float().mean() / k
