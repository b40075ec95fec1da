import pytest
import torch
from gloo import run_gloo
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distributed_je import losses
from distributed_je.losses import cross_correlation_loss

N_CELLS, N_LATENT, LAMBDA = 64, 6, 0.01


def naive_cco(z1, z2, lambda_off_diag):
    """Textbook Barlow Twins with explicit loops, biased std."""
    n, d = z1.shape
    a = (z1 - z1.mean(0)) / (z1.std(0, unbiased=False) + 1e-5)
    b = (z2 - z2.mean(0)) / (z2.std(0, unbiased=False) + 1e-5)
    loss = torch.zeros((), dtype=z1.dtype)
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[k, i] * b[k, j] for k in range(n)) / n
            loss = loss + ((1 - c_ij) ** 2 if i == j else lambda_off_diag * c_ij**2)
    return loss


@pytest.fixture(params=["numpy", "torch"])
def backend(request, monkeypatch):
    """The loss runs in numpy on CPU and in torch on GPUs: check both here, torch's on CPU."""
    if request.param == "torch":
        monkeypatch.setattr(losses, "_in_numpy", lambda views: False)
    return request.param


def latents(seed=0, n=N_CELLS, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, N_LATENT, generator=g)
    z2 = z1 + 0.5 * torch.randn(n, N_LATENT, generator=g)
    return z1.requires_grad_(requires_grad), z2.requires_grad_(requires_grad)


def test_matches_naive_reference(backend):
    z1, z2 = latents(n=20)
    expected = naive_cco(z1.double(), z2.double(), LAMBDA)
    assert torch.allclose(cross_correlation_loss(z1, z2, lambda_off_diag=LAMBDA), expected.float(), rtol=1e-5)


def test_identical_views_have_no_on_diagonal_term(backend):
    z1, _ = latents()
    on_diagonal_only = cross_correlation_loss(z1, z1.clone(), lambda_off_diag=0.0)
    assert on_diagonal_only.item() < 1e-6


def test_mismatched_shapes_are_refused():
    z1, z2 = latents()
    with pytest.raises(ValueError, match="same shape"):
        cross_correlation_loss(z1, z2[:, :3])


def _half_batch_loss(rank, world_size, z1, z2, gather):
    rows = slice(rank * len(z1) // world_size, (rank + 1) * len(z1) // world_size)
    a, b = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
    loss = cross_correlation_loss(a, b, lambda_off_diag=LAMBDA, gather=gather)
    loss.backward()
    return loss.detach(), a.grad, b.grad


@pytest.mark.distributed
def test_two_gloo_processes_equal_one_process_for_loss_and_input_gradients():
    z1, z2 = latents(requires_grad=True)
    single = cross_correlation_loss(z1, z2, lambda_off_diag=LAMBDA)
    single.backward()

    results = run_gloo(_half_batch_loss, 2, z1.detach(), z2.detach(), True)
    for loss, _, _ in results:
        assert torch.allclose(loss, single.detach(), atol=1e-5)
    # DDP averages gradients over ranks: each rank's input gradient divided by the world size
    grad_z1 = torch.cat([g1 for _, g1, _ in results]) / 2
    grad_z2 = torch.cat([g2 for _, _, g2 in results]) / 2
    assert torch.allclose(grad_z1, z1.grad, atol=1e-5)
    assert torch.allclose(grad_z2, z2.grad, atol=1e-5)


@pytest.mark.distributed
def test_without_gather_each_rank_sees_only_its_half():
    z1, z2 = latents()
    results = run_gloo(_half_batch_loss, 2, z1, z2, False)
    local = cross_correlation_loss(z1[: N_CELLS // 2], z2[: N_CELLS // 2], lambda_off_diag=LAMBDA)
    assert torch.allclose(results[0][0], local, atol=1e-5)
    assert not torch.allclose(results[0][0], cross_correlation_loss(z1, z2, lambda_off_diag=LAMBDA), atol=1e-3)


def _projector(seed=0):
    torch.manual_seed(seed)
    return nn.Linear(10, N_LATENT)


def _ddp_parameter_gradients(rank, world_size, x1, x2):
    projector = DistributedDataParallel(_projector())
    rows = slice(rank * len(x1) // world_size, (rank + 1) * len(x1) // world_size)
    cross_correlation_loss(projector(x1[rows]), projector(x2[rows]), lambda_off_diag=LAMBDA).backward()
    return [p.grad for p in projector.parameters()]


@pytest.mark.distributed
def test_ddp_parameter_gradients_equal_single_process_with_unequal_shards():
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(45, 10, generator=g)  # 22 and 23 cells per rank
    x2 = x1 + 0.3 * torch.randn(45, 10, generator=g)
    projector = _projector()
    cross_correlation_loss(projector(x1), projector(x2), lambda_off_diag=LAMBDA).backward()
    expected = [p.grad for p in projector.parameters()]
    for rank_grads in run_gloo(_ddp_parameter_gradients, 2, x1, x2):
        for got, want in zip(rank_grads, expected):
            assert torch.allclose(got, want, atol=1e-5)


def test_closed_form_gradient_matches_autograd_on_the_naive_loss(backend):
    z1, z2 = (z.double().requires_grad_() for z in latents(n=12))
    z2.data[:, 0] = 3.0  # a constant dimension: its z-score is 0, its gradient finite
    expected = torch.autograd.grad(naive_cco(z1, z2, LAMBDA), (z1, z2))
    got = torch.autograd.grad(cross_correlation_loss(z1, z2, lambda_off_diag=LAMBDA), (z1, z2))
    for a, b in zip(got, expected, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5)


def test_closed_form_gradient_passes_gradcheck(backend):
    z1, z2 = latents(n=10)
    views = torch.cat([z1, z2], dim=1).double().requires_grad_()
    assert torch.autograd.gradcheck(lambda v: losses._CrossCorrelationLoss.apply(v, LAMBDA), (views,))
