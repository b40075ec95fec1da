"""Count likelihoods: log-probabilities of observed counts, pure functions over tensors.

Parameterisation as in scvi-tools: mean ``mu`` and inverse dispersion ``theta`` for the
negative binomial (variance mu + mu**2 / theta); ``zi_logits`` are the logits of the
zero-inflation probability.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-8  # keeps log() finite where a rate underflows to zero


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    log_theta_mu = torch.log(theta + mu + EPS)
    return (
        theta * (torch.log(theta + EPS) - log_theta_mu)
        + x * (torch.log(mu + EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def log_zinb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, zi_logits: torch.Tensor) -> torch.Tensor:
    log_pi = -F.softplus(-zi_logits)  # log P(structural zero)
    log_not_pi = -F.softplus(zi_logits)
    nb = log_nb(x, mu, theta)
    zero = torch.logaddexp(log_pi, log_not_pi + nb)
    return torch.where(x < 0.5, zero, log_not_pi + nb)


def log_poisson(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    return x * torch.log(mu + EPS) - mu - torch.lgamma(x + 1)


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
