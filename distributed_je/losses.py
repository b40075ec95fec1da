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
    return _CrossCorrelationLoss.apply(views, lambda_off_diag)


class _CrossCorrelationLoss(torch.autograd.Function):
    """The loss over stacked views (2, n_cells, n_latent), with its gradient in closed form: about
    half the tiny operations autograd would record (0.33 -> 0.27 ms forward and backward at 128
    cells on one CPU core)."""

    @staticmethod
    def forward(ctx, views: torch.Tensor, lambda_off_diag: float) -> torch.Tensor:
        n_cells = views.shape[1]
        centered = views - views.mean(1, keepdim=True)
        std = centered.pow(2).mean(1, keepdim=True).sqrt()  # biased: defined for a single cell
        scaled = centered / (std + STD_EPS)
        c = scaled[0].T @ scaled[1] / n_cells  # (n_latent, n_latent)
        diagonal = torch.diagonal(c)
        # sum_i (1 - C_ii)^2 + lambda * (sum_ij C_ij^2 - sum_i C_ii^2)
        loss = ((1.0 - diagonal).pow(2) - lambda_off_diag * diagonal.pow(2)).sum() + lambda_off_diag * c.pow(2).sum()
        ctx.save_for_backward(centered, std, scaled, c)
        ctx.lambda_off_diag = lambda_off_diag
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        centered, std, scaled, c = ctx.saved_tensors
        n_cells = centered.shape[1]
        grad_c = 2 * ctx.lambda_off_diag * c
        grad_c.diagonal().copy_(2 * (torch.diagonal(c) - 1))
        # dL/dscaled: view 1 gets scaled_2 @ G^T, view 2 gets scaled_1 @ G
        grad_scaled = torch.bmm(scaled.flip(0), torch.stack([grad_c.T, grad_c])) * (grad / n_cells)
        # through the z-score: (g - mean g) / (s + eps) - centered * mean(g * centered) / ((s + eps)^2 s);
        # a constant dimension (s = 0) has centered = 0, so its second term is 0, not 0 / 0
        denominator = std + STD_EPS
        spread = (grad_scaled * centered).mean(1, keepdim=True) / (denominator.pow(2) * std.clamp(min=1e-30))
        grad_views = (grad_scaled - grad_scaled.mean(1, keepdim=True)) / denominator - centered * spread
        return grad_views, None
