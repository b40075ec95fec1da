"""The joint-embedding loss: a Barlow-Twins cross-correlation between two views' latents."""

from __future__ import annotations

import torch

from distributed_je.collectives import all_gather_with_grad

STD_EPS = 1e-5  # keeps the z-score finite for a latent dimension that is constant in the batch


def cross_correlation_loss(z1: torch.Tensor, z2: torch.Tensor, *, lambda_off_diag: float = 0.01,
                           gather: bool = True) -> torch.Tensor:
    """sum_i (1 - C_ii)^2 + lambda_off_diag * sum_{i != j} C_ij^2 for C = z1_hat^T z2_hat / N.

    ``z1`` and ``z2`` are (n_cells, n_latent) latents of two views of the same cells; each
    latent dimension is z-scored over the batch with its biased std. With ``gather`` inside
    a process group of several ranks, the statistics and C are taken over the global batch,
    so every rank returns the loss that one process holding all cells would compute.
    """
    if z1.shape != z2.shape:
        raise ValueError(f"z1 {tuple(z1.shape)} and z2 {tuple(z2.shape)} must have the same shape")
    views = torch.stack([z1, z2]).float()  # (2, n_cells, n_latent): one gather for both views
    if gather:
        views = all_gather_with_grad(views.transpose(0, 1)).transpose(0, 1)
    n_cells = views.shape[1]
    std, mean = torch.std_mean(views, dim=1, keepdim=True, correction=0)  # biased: defined for a single cell
    z1_hat, z2_hat = ((views - mean) / (std + STD_EPS)).unbind(0)
    c = z1_hat.T @ z2_hat / n_cells  # (n_latent, n_latent)
    diagonal = torch.diagonal(c)
    # sum_i (1 - C_ii)^2 + lambda * (sum_ij C_ij^2 - sum_i C_ii^2)
    return ((1.0 - diagonal).pow(2) - lambda_off_diag * diagonal.pow(2)).sum() + lambda_off_diag * c.pow(2).sum()
