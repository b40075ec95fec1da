"""The few collectives the maths needs, autograd-aware where gradients flow through them."""

from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (n_local, ...) from every rank along dim 0, in rank order.

    Ranks may hold different numbers of rows. Gradients flow back to each rank's own rows:
    since every rank computes the same loss from the gathered tensor, the gradient of a
    rank's rows is the sum over ranks of the gradients each rank's loss gives them.
    """
    if world_size() == 1:
        return x
    return _AllGather.apply(x)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        n_local = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes = [torch.zeros_like(n_local) for _ in range(world)]
        dist.all_gather(sizes, n_local)
        sizes = [int(s.item()) for s in sizes]
        n_max = max(sizes)
        padded = x.new_zeros((n_max, *x.shape[1:]))
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(world)]
        dist.all_gather(parts, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        # all_reduce rather than reduce_scatter: gloo has no reduce_scatter, and the
        # gathered latents are small (global batch x n_latent).
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = sum(ctx.sizes[: ctx.rank])
        return grad[start : start + ctx.sizes[ctx.rank]]


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor of statistics (no gradient) over ranks; identity outside a process group."""
    if world_size() == 1:
        return values
    values = values.detach().clone()
    dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def all_reduce_max(value: float) -> float:
    """The largest ``value`` over ranks, so that every rank takes the same decision from it."""
    if world_size() == 1:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        tensor = tensor.cuda()
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor.item())
