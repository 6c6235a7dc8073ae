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


# ---- the stabilising levers' loss terms (docs/objectives.md, "Keeping online DPO stable")

def _batch(seed: int, shape=(6, 4, 8)):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(shape, generator=g)
    return target, target + 0.3 * torch.randn(shape, generator=g), target + 0.3 * torch.randn(shape, generator=g)


def test_pair_weights_weight_each_pairs_loss():
    from dpo_loss import margin_pair_weights

    target, model_pred, ref_pred = _batch(1)
    weights = torch.tensor([0.5, 2.0, 0.5])
    loss, _ = diffusion_dpo_loss(model_pred, ref_pred, target, 100.0, pair_weights=weights)
    per_pair = torch.stack([reference_loss(model_pred[2 * i:2 * i + 2], ref_pred[2 * i:2 * i + 2],
                                           target[2 * i:2 * i + 2], 100.0)[0] for i in range(3)])
    assert loss.item() == pytest.approx((weights.double() * per_pair).mean().item(), rel=1e-5)
    assert margin_pair_weights(torch.tensor([0.1, 0.3, 0.2])).tolist() == pytest.approx([0.5, 1.5, 1.0])
    assert margin_pair_weights(torch.tensor([0.1, 0.3]), mean_margin=0.4).tolist() == pytest.approx([0.25, 0.75])
    assert margin_pair_weights(torch.zeros(2)).tolist() == [1.0, 1.0]  # no margin to weigh by: unweighted
    with pytest.raises(ValueError, match="one weight per pair"):
        diffusion_dpo_loss(model_pred, ref_pred, target, 100.0, pair_weights=torch.ones(2))


def test_rejected_scale_keeps_the_value_and_scales_only_the_rejected_gradient():
    target, model_pred, ref_pred = _batch(2)
    grads = []
    for scale in (1.0, torch.tensor(0.25)):
        pred = model_pred.clone().requires_grad_(True)
        loss, _ = diffusion_dpo_loss(pred, ref_pred, target, 100.0, rejected_scale=scale)
        loss.backward()
        grads.append((loss.item(), pred.grad))
    (plain, g1), (scaled, g2) = grads
    assert scaled == pytest.approx(plain, rel=1e-6)
    assert torch.allclose(g2[0::2], g1[0::2]) and torch.allclose(g2[1::2], 0.25 * g1[1::2])


def test_winner_preserving_scale_is_the_papers_bound():
    """lambda = (1 - mu) ||gA||^2 / (gB . gA) when gB . gA > 0, clamped to [0, 1]; 1 otherwise; the
    output-space gradients taken by autograd here (as the official code does)."""
    from dpo_loss import winner_preserving_scale

    def independent(pred, target, mu):
        pw, pl = pred[0::2].double().requires_grad_(True), pred[1::2].double().requires_grad_(True)
        a = ((pw - target[0::2].double()) ** 2).mean()
        b = ((pl - target[1::2].double()) ** 2).mean()
        ga, gb = torch.autograd.grad(a, pw)[0], torch.autograd.grad(b, pl)[0]
        den = (ga * gb).sum()
        return min(max(((1 - mu) * (ga * ga).sum() / den).item(), 0.0), 1.0) if den > 0 else 1.0

    target = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(3))
    error = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(4))
    aligned = target.clone()
    aligned[0::2] += 0.1 * error  # small chosen error ...
    aligned[1::2] += error  # ... in the rejected error's direction: the bound bites
    opposed = target.clone()
    opposed[0::2] += error
    opposed[1::2] -= error  # opposite directions: no constraint
    for pred, mu in ((aligned, 0.0), (aligned, 0.5), (opposed, 0.0)):
        assert winner_preserving_scale(pred, target, mu).item() == pytest.approx(independent(pred, target, mu), rel=1e-4)
    assert winner_preserving_scale(aligned, target).item() == pytest.approx(0.1, rel=1e-3)  # ||0.1e||^2 / (e . 0.1e)
    assert winner_preserving_scale(opposed, target).item() == 1.0
    with pytest.raises(ValueError, match="mu"):
        winner_preserving_scale(aligned, target, 1.5)


def test_winner_preserving_scale_keeps_the_chosen_error_from_rising_to_first_order():
    """A gradient step on the DPO loss in output space, with the scale: the chosen error's first-order
    change is <= 0 (the paper's guarantee); without it, here, it rises."""
    from dpo_loss import winner_preserving_scale

    target = torch.zeros(2, 8)
    pred = torch.tensor([[0.2] * 8, [1.0] * 8])  # chosen and rejected errors in the same direction
    ref_pred = torch.tensor([[0.2] * 8, [0.5] * 8])  # the policy fits the rejected one worse already: DPO pushes on
    rises = []
    for scale in (1.0, winner_preserving_scale(pred, target)):
        p = pred.clone().requires_grad_(True)
        diffusion_dpo_loss(p, ref_pred, target, 10.0, rejected_scale=scale)[0].backward()
        chosen_error_grad = 2 * (pred[0] - target[0]) / pred[0].numel()
        # one output-space gradient step moves both rows (they share the parameters: both rows' steps apply)
        step = -(p.grad[0] + p.grad[1])
        rises.append(float((chosen_error_grad * step).sum()))
    assert rises[0] > 0 and rises[1] <= 1e-9


def test_chosen_sft_loss_is_the_chosen_rows_flow_matching_loss():
    from dpo_loss import chosen_sft_loss

    target, model_pred, _ = _batch(5)
    pred = model_pred.clone().requires_grad_(True)
    values = chosen_sft_loss(pred, target)
    assert values.shape == (3,)
    assert values.tolist() == pytest.approx(((model_pred[0::2] - target[0::2]) ** 2).reshape(3, -1).mean(1).tolist(), rel=1e-6)
    values.sum().backward()
    assert pred.grad[1::2].abs().max() == 0 and pred.grad[0::2].abs().min() > 0


def test_velocity_norm_ratio_and_norm_guard_penalty():
    from dpo_loss import norm_guard_penalty, velocity_norm_ratio

    ref_pred = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(6))
    factors = torch.tensor([0.5, 1.0, 1.04, 1.3])
    model_pred = ref_pred * factors.view(-1, 1, 1)
    assert velocity_norm_ratio(model_pred, ref_pred).tolist() == pytest.approx(factors.tolist(), rel=1e-5)
    pred = model_pred.clone().requires_grad_(True)
    penalty = norm_guard_penalty(pred, ref_pred, 0.05)
    assert penalty.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.25 ** 2], abs=1e-6)  # within 5 %: free
    penalty.sum().backward()
    # d/dv (||v|| / r - 1.05)^2 = 2 (ratio - 1.05) v / (||v|| r), only the inflated row
    row = model_pred[3]
    expected = 2 * 0.25 * row / (row.norm() * ref_pred[3].norm())
    assert torch.allclose(pred.grad[3], expected, rtol=1e-4, atol=1e-7) and pred.grad[:3].abs().max() == 0


def test_loss_metrics_report_the_velocity_norm_ratio():
    target, _, ref_pred = _batch(7)
    _, metrics = diffusion_dpo_loss(1.1 * ref_pred, ref_pred, target, 100.0)
    assert metrics["velocity_norm_ratio"] == pytest.approx(1.1, rel=1e-5)
