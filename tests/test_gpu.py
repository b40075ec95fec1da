"""The per-worker loop on a CUDA device, without Ray (skipped where there is none)."""

import pytest
import torch

from distributed_je.augment import binomial_thin
from distributed_je.config import load_config
from distributed_je.counts import minibatches
from distributed_je.keys import BATCH_INDEX, COUNTS
from distributed_je.loop import TrainState, build_model, build_optimizer, train_epoch
from distributed_je.seeding import numpy_generator
from distributed_je.synthetic import synthetic_counts

pytestmark = pytest.mark.gpu


def _csr_batches(matrix, epoch):
    """As the loader's densify-on-device mode hands them: CSR counts that the loop densifies on the GPU."""
    for batch in minibatches(matrix, batch_size=128, rng=numpy_generator(0, 0, epoch), drop_last=True):
        batch[COUNTS] = batch[COUNTS].to_sparse_csr()
        yield batch


def test_je_trains_on_the_gpu_from_csr_batches_under_bf16():
    matrix = synthetic_counts(1024, 200, seed=0)
    config = load_config(None, ["model.variant=je"])
    model = build_model(config, matrix.n_genes, matrix.n_batches).cuda()
    optimizer = build_optimizer(model, config.optim)
    state = TrainState()
    losses = [train_epoch(model, optimizer, _csr_batches(matrix, epoch), state=state, config=config,
                          device="cuda")["train_loss"] for epoch in range(5)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


def test_the_encoder_gives_the_same_latent_on_cpu_and_gpu():
    """The CPU reads counts at their non-zeros, the GPU with a dense matmul: the same function."""
    matrix = synthetic_counts(256, 200, seed=1)
    model = build_model(load_config(None, []), matrix.n_genes, matrix.n_batches)
    batch = next(minibatches(matrix, batch_size=256))
    on_cpu = model.encode(batch[COUNTS], batch[BATCH_INDEX])
    on_gpu = model.cuda().encode(batch[COUNTS].cuda(), batch[BATCH_INDEX].cuda())
    torch.testing.assert_close(on_gpu.cpu(), on_cpu, rtol=1e-3, atol=1e-3)


def test_thinning_on_the_gpu_keeps_p_of_the_counts():
    x = torch.full((4, 20000), 5.0, device="cuda")
    p = torch.tensor([0.1, 0.3, 0.6, 0.9], device="cuda")
    y = binomial_thin(x, p, generator=torch.Generator(device="cuda").manual_seed(0))
    assert torch.equal(y, y.round()) and bool((y <= x).all())
    standard_error = (5 * p * (1 - p) / x.shape[1]).sqrt()
    assert bool(((y.mean(1) - 5 * p).abs() <= 5 * standard_error).all())


def test_the_cross_correlation_loss_and_gradient_agree_on_cpu_and_gpu():
    """On CPU the loss runs in numpy, on a GPU in torch: the same lines, the same numbers."""
    from distributed_je.losses import cross_correlation_loss

    generator = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(128, 10, generator=generator, dtype=torch.float64) for _ in range(2))
    results = []
    for device in ("cpu", "cuda"):
        a, b = (z.to(device).requires_grad_() for z in (z1, z2))
        loss = cross_correlation_loss(a, b, gather=False)
        results.append((loss.detach().cpu(), *(g.cpu() for g in torch.autograd.grad(loss, (a, b)))))
    for on_cpu, on_gpu in zip(*results, strict=True):
        torch.testing.assert_close(on_gpu, on_cpu, rtol=1e-4, atol=1e-6)


def test_the_cross_correlation_loss_runs_in_float32_under_bf16_autocast():
    from distributed_je.losses import cross_correlation_loss

    generator = torch.Generator().manual_seed(0)
    z1 = torch.randn(128, 10, generator=generator).cuda()
    z2 = z1 + 0.05 * torch.randn(128, 10, generator=generator).cuda()  # C's diagonal near 1: bf16 would round it
    full = cross_correlation_loss(z1, z2, gather=False)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        mixed = cross_correlation_loss(z1, z2, gather=False)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, full, rtol=1e-5, atol=1e-6)
