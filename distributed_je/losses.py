"""The joint-embedding loss: a Barlow-Twins cross-correlation between two views' latents."""

from __future__ import annotations

import numpy as np
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
    """The loss over stacked views (2, n_cells, n_latent), with its gradient in closed form.

    The arrays are tiny (2 x 128 x 10 at batch 128), so what they cost is per-operation
    overhead: on CPU both passes run in numpy (~1 us an operation against torch's ~10), the
    same lines as torch runs on a GPU (the methods used take the same arguments in both).
    """

    @staticmethod
    def forward(ctx, views: torch.Tensor, lambda_off_diag: float) -> torch.Tensor:
        on_cpu = views.device.type == "cpu"
        views = views.detach().numpy() if on_cpu else views
        n_cells = views.shape[1]
        centered = views - views.mean(axis=1, keepdims=True)
        std = (centered**2).mean(axis=1, keepdims=True) ** 0.5  # biased: defined for a single cell
        scaled = centered / (std + STD_EPS)
        c = scaled[0].T @ scaled[1] / n_cells  # (n_latent, n_latent)
        diagonal = c.diagonal()
        # sum_i (1 - C_ii)^2 + lambda * (sum_ij C_ij^2 - sum_i C_ii^2)
        loss = ((1.0 - diagonal) ** 2 - lambda_off_diag * diagonal**2).sum() + lambda_off_diag * (c**2).sum()
        ctx.lambda_off_diag, ctx.saved = lambda_off_diag, (centered, std, scaled, c)
        return torch.as_tensor(loss) if on_cpu else loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        lam = ctx.lambda_off_diag
        centered, std, scaled, c = ctx.saved
        on_cpu = isinstance(c, np.ndarray)  # forward ran in numpy
        xp = np if on_cpu else torch
        scale = (grad.item() if on_cpu else grad) / centered.shape[1]
        diagonal = c.diagonal()
        grad_c = 2 * lam * c + xp.diag(2 * (diagonal - 1) - 2 * lam * diagonal)  # dL/dC
        # dL/dscaled: view 1 gets scaled_2 @ G^T, view 2 gets scaled_1 @ G
        grad_scaled = (scaled[[1, 0]] @ xp.stack([grad_c.T, grad_c])) * scale
        # through the z-score: (g - mean g) / (s + eps) - centered * mean(g * centered) / ((s + eps)^2 s);
        # a constant dimension (s = 0) has centered = 0, so its second term is 0, not 0 / 0
        denominator = std + STD_EPS
        spread = (grad_scaled * centered).mean(axis=1, keepdims=True) / (denominator**2 * std.clip(min=1e-30))
        grad_views = (grad_scaled - grad_scaled.mean(axis=1, keepdims=True)) / denominator - centered * spread
        return (torch.from_numpy(grad_views) if on_cpu else grad_views), None
