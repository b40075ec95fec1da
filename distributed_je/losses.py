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
    views = torch.cat([z1, z2], dim=1).float()  # (n_cells, 2 x n_latent): one gather for both views
    if gather:
        views = all_gather_with_grad(views)
    return _CrossCorrelationLoss.apply(views, lambda_off_diag)


def _in_numpy(views: torch.Tensor) -> bool:
    """Whether the loss runs in numpy (on CPU) rather than torch (tests switch it to cover both)."""
    return views.device.type == "cpu"


class _CrossCorrelationLoss(torch.autograd.Function):
    """The loss over both views side by side (n_cells, 2 x n_latent), with its gradient in closed form.

    The arrays are tiny (128 x 20 at batch 128), so what they cost is per-operation overhead:
    on CPU they run in numpy (~1-5 us an operation against torch's ~10), the same lines as
    torch runs on a GPU (the methods used take the same arguments in both), and every
    reduction is over the cells of a 2-D array, numpy's fast case. The gradient is taken in
    the forward pass, in one burst with the loss: split between forward and backward, with the
    rest of a training step in between, the same numpy calls took ~3x as long (their code no
    longer in cache). Under autocast it runs in float32: in bfloat16, C's entries near 1 round
    to steps of 2^-8, coarser than the 1 - C_ii the loss drives to 0.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, views: torch.Tensor, lambda_off_diag: float) -> torch.Tensor:
        in_numpy = _in_numpy(views)
        xp = np if in_numpy else torch
        x = views.detach().numpy() if in_numpy else views
        n_cells, n_latent = x.shape[0], x.shape[1] // 2
        centered = x - x.sum(axis=0) / n_cells
        std = ((centered * centered).sum(axis=0) / n_cells) ** 0.5  # biased: defined for a single cell
        denominator = std + STD_EPS
        scaled = centered / denominator
        c = scaled[:, :n_latent].T @ scaled[:, n_latent:] / n_cells  # (n_latent, n_latent)
        diagonal = c.diagonal()
        lam = lambda_off_diag
        # sum_i (1 - C_ii)^2 + lambda * (sum_ij C_ij^2 - sum_i C_ii^2)
        loss = ((1.0 - diagonal) ** 2 - lam * diagonal**2).sum() + lam * (c * c).sum()
        ctx.grad_views = None
        if ctx.needs_input_grad[0]:
            grad_c = 2 * lam * c + xp.diag(2 * (diagonal - 1) - 2 * lam * diagonal)  # dL/dC
            # dL/dscaled: view 1's columns get scaled_2 @ G^T, view 2's get scaled_1 @ G
            grad_scaled = xp.concatenate([scaled[:, n_latent:] @ grad_c.T, scaled[:, :n_latent] @ grad_c],
                                         axis=1) / n_cells
            # through the z-score: (g - mean g) / (s + eps) - centered * mean(g * centered) / ((s + eps)^2 s);
            # a constant dimension (s = 0) has centered = 0, so its second term is 0, not 0 / 0
            spread = (grad_scaled * centered).sum(axis=0) / (n_cells * denominator**2 * std.clip(min=1e-30))
            grad_views = (grad_scaled - grad_scaled.sum(axis=0) / n_cells) / denominator - centered * spread
            ctx.grad_views = torch.from_numpy(grad_views) if in_numpy else grad_views
        return torch.as_tensor(loss) if in_numpy else loss

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor):
        return ctx.grad_views * grad, None
