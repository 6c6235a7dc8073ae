import math

import pytest
import torch
import torch.nn.functional as F

from dpo_loss import diffusion_dpo_loss, noisy_latents, per_sample_mse, velocity_target


def reference_loss(model_pred, ref_pred, target, beta):
    """Straightforward re-computation, one pair at a time, in float64."""
    losses, insides = [], []
    for i in range(model_pred.shape[0] // 2):
        def err(pred, row):
            return ((pred[row].double() - target[row].double()) ** 2).mean()
        w, l = 2 * i, 2 * i + 1
        inside = -0.5 * beta * ((err(model_pred, w) - err(ref_pred, w)) - (err(model_pred, l) - err(ref_pred, l)))
        insides.append(inside)
        losses.append(-F.logsigmoid(inside))
    return torch.stack(losses).mean(), torch.stack(insides)


@pytest.mark.parametrize("beta", [1.0, 100.0, 2000.0, 5000.0])
@pytest.mark.parametrize("shape", [(2, 5), (4, 16, 64), (6, 3, 4, 4)])
def test_loss_and_metrics_match_the_formula(beta, shape):
    g = torch.Generator().manual_seed(int(beta) + len(shape))
    target = torch.randn(shape, generator=g)
    model_pred = target + 0.3 * torch.randn(shape, generator=g)
    ref_pred = target + 0.3 * torch.randn(shape, generator=g)
    loss, metrics = diffusion_dpo_loss(model_pred, ref_pred, target, beta)
    expected, inside = reference_loss(model_pred, ref_pred, target, beta)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-5)
    assert metrics["implicit_acc"] == pytest.approx((inside > 0).double().mean().item())
    assert metrics["inside_mean"] == pytest.approx(inside.mean().item(), rel=1e-4, abs=1e-4)
    err = lambda p: ((p.double() - target.double()) ** 2).reshape(shape[0], -1).mean(1)
    assert metrics["model_err_chosen"] == pytest.approx(err(model_pred)[0::2].mean().item(), rel=1e-5)
    assert metrics["ref_err_rejected"] == pytest.approx(err(ref_pred)[1::2].mean().item(), rel=1e-5)
    chosen = (-0.5 * beta * (err(model_pred)[0::2] - err(ref_pred)[0::2])).mean().item()
    rejected = (-0.5 * beta * (err(model_pred)[1::2] - err(ref_pred)[1::2])).mean().item()
    assert metrics["reward_chosen"] == pytest.approx(chosen, rel=1e-4, abs=1e-4)
    assert metrics["reward_rejected"] == pytest.approx(rejected, rel=1e-4, abs=1e-4)
    assert metrics["reward_margin"] == pytest.approx(chosen - rejected, rel=1e-4, abs=1e-4)
    assert all(isinstance(v, float) for v in metrics.values())


def test_equal_policy_and_reference_give_log2_and_no_accuracy():
    target = torch.randn(4, 8)
    pred = torch.randn(4, 8)
    loss, metrics = diffusion_dpo_loss(pred, pred.clone(), target, 100.0)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert metrics["implicit_acc"] == 0.0  # strictly greater than 0 counts


def test_bf16_inputs_are_computed_in_fp32():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(4, 32, 16, generator=g)
    model_pred, ref_pred = target + 0.1 * torch.randn(target.shape, generator=g), target + 0.1 * torch.randn(target.shape, generator=g)
    loss16, _ = diffusion_dpo_loss(model_pred.bfloat16(), ref_pred.bfloat16(), target.bfloat16(), 500.0)
    expected, _ = reference_loss(model_pred.bfloat16().float(), ref_pred.bfloat16().float(), target.bfloat16().float(), 500.0)
    assert loss16.dtype == torch.float32
    assert loss16.item() == pytest.approx(expected.item(), rel=1e-5)


def test_gradient_lowers_chosen_error_and_raises_rejected_error():
    g = torch.Generator().manual_seed(1)
    target = torch.randn(6, 10, generator=g)
    ref_pred = target + 0.5 * torch.randn(6, 10, generator=g)
    model_pred = ref_pred.clone().requires_grad_(True)
    loss, _ = diffusion_dpo_loss(model_pred, ref_pred, target, 50.0)
    loss.backward()
    stepped = (model_pred - 0.05 * model_pred.grad).detach()
    before, after = per_sample_mse(model_pred.detach(), target), per_sample_mse(stepped, target)
    assert (after[0::2] < before[0::2]).all()
    assert (after[1::2] > before[1::2]).all()
    assert diffusion_dpo_loss(stepped, ref_pred, target, 50.0)[0] < loss


def test_flow_matching_helpers():
    x0, noise = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    sigmas = torch.tensor([0.0, 0.25, 0.5, 1.0])
    xs = noisy_latents(x0, noise, sigmas)
    assert torch.allclose(xs[0], x0[0]) and torch.allclose(xs[3], noise[3])
    assert torch.allclose(xs[1], 0.75 * x0[1] + 0.25 * noise[1])
    # the target is the derivative of x_s with respect to s
    eps = 1e-3
    numeric = (noisy_latents(x0, noise, sigmas + eps) - noisy_latents(x0, noise, sigmas - eps)) / (2 * eps)
    assert torch.allclose(numeric, velocity_target(x0, noise), atol=1e-3)


@pytest.mark.parametrize("bad", [
    dict(rows=3), dict(rows=0), dict(mismatch=True), dict(beta=0.0), dict(beta=-1.0),
    dict(beta=float("nan")), dict(beta=float("inf")),
])
def test_invalid_inputs_raise_value_error(bad):
    rows = bad.get("rows", 4)
    target = torch.randn(rows, 5)
    model = torch.randn(rows, 6) if bad.get("mismatch") else torch.randn(rows, 5)
    with pytest.raises(ValueError):
        diffusion_dpo_loss(model, torch.randn(rows, 5), target, bad.get("beta", 10.0))
