"""group_losses.py against straightforward per-group / per-sample re-computations (float64 loops),
the invariances the papers imply, and the error paths."""

import math

import pytest
import torch

from group_losses import (awm_log_likelihood, awm_loss, dgpo_loss, group_advantages, nft_loss,
                          sample_group_noise_and_sigmas)


# ---------------------------------------------------------------- independent re-implementations

def ref_advantages(rewards, group_ids):
    out = [0.0] * len(rewards)
    for g in dict.fromkeys(group_ids):
        rows = [i for i, x in enumerate(group_ids) if x == g]
        values = [float(rewards[i]) for i in rows]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        for i, v in zip(rows, values):
            out[i] = 0.0 if std == 0 else (v - mean) / std
    return out


def mse(a, b):
    return ((a.double() - b.double()) ** 2).mean()


def ref_dgpo(model, ref, target, adv, groups, beta, kl_weight=0.0, exact=False):
    """(1/beta) * mean over groups of -logsigmoid(z_g) (+ KL): the official gradient scale."""
    losses = []
    for g in dict.fromkeys(groups.tolist()):
        rows = [i for i in range(len(groups)) if groups[i] == g]
        z = sum(adv[i].double() * (-beta) * (mse(model[i], target[i]) - mse(ref[i], target[i])) for i in rows) / len(rows)
        losses.append(-torch.nn.functional.logsigmoid(z))
    kl = sum(mse(model[i], ref[i]) for i in range(len(model))) / len(model)
    return sum(losses) / len(losses) / (1.0 if exact else beta) + kl_weight * kl


def official_dgpo_surrogate(model, ref, target, adv, groups, beta, kl_weight=0.0):
    """The official DGPO loss, re-derived from scripts/train_sd3_dgpo.py
    (`compute_group_dgpo_loss_allreduce`, then `loss = dgpo_loss + train.beta * kl_loss`): a group
    weight sigmoid(sum_{i in g} A_i * beta * (err_i - err_ref_i) / K), detached, times A_i * err_i,
    averaged over rows; the KL a mean over rows of mean((v - v_ref)^2)."""
    rows = range(len(groups))
    weights = {}
    for g in dict.fromkeys(groups.tolist()):
        members = [i for i in rows if groups[i] == g]
        s = sum(adv[i].double() * beta * (mse(model[i], target[i]) - mse(ref[i], target[i])).detach() for i in members)
        weights[g] = torch.sigmoid(s / len(members))
    policy = sum(weights[groups[i].item()] * adv[i].double() * mse(model[i], target[i]) for i in rows) / len(groups)
    kl = sum(mse(model[i], ref[i]) for i in rows) / len(groups)
    return policy + kl_weight * kl, policy, kl


def ref_nft(model, old, target, sigmas, adv, beta, c, ref=None, kl_weight=0.0):
    total = 0.0
    for i in range(model.shape[0]):
        s = sigmas[i].double()
        a = min(max(adv[i].item(), -c), c)
        r = min(max(a / c / 2 + 0.5, 0.0), 1.0)
        m, o, t = model[i].double(), old[i].double(), target[i].double()

        def weighted(v):
            x0_error = s * (t - v)  # (x_s - s v) - x0
            return (x0_error ** 2).mean() / max(x0_error.detach().abs().mean().item(), 1e-5)

        total = total + c * (r * weighted(beta * m + (1 - beta) * o) + (1 - r) * weighted((1 + beta) * o - beta * m)) / beta
        if kl_weight:
            total = total + kl_weight * mse(model[i], ref[i])
    return total / model.shape[0]


def ref_awm(model, old, target, sigmas, adv, eps, c, amax, ref=None, kl_weight=0.0, old_kl_weight=0.0):
    total = 0.0
    for i in range(model.shape[0]):
        ratio = torch.exp(-mse(model[i], target[i]) + mse(old[i], target[i]).detach())
        a = min(max(adv[i].item(), -c), c) / c * amax
        total = total + torch.maximum(-a * ratio, -a * ratio.clamp(1 - eps, 1 + eps))
        if kl_weight:
            total = total + kl_weight * mse(model[i], ref[i])
        if old_kl_weight:
            total = total + old_kl_weight * mse(model[i], old[i])
    return total / model.shape[0]


def batch(n=6, shape=(3, 4), seed=0, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    target = torch.randn(n, *shape, generator=g)
    model = target + spread * torch.randn(n, *shape, generator=g)
    ref = target + spread * torch.randn(n, *shape, generator=g)
    old = target + spread * torch.randn(n, *shape, generator=g)
    sigmas = torch.rand(n, generator=g) * 0.9 + 0.05
    return target, model, ref, old, sigmas


def grads(fn, model):
    leaf = model.clone().requires_grad_(True)
    value = fn(leaf)
    (value[0] if isinstance(value, tuple) else value).backward()
    return (value[0] if isinstance(value, tuple) else value).detach(), leaf.grad


# ---------------------------------------------------------------- advantages

def test_group_advantages_match_a_loop_and_skip_zero_variance_groups():
    ids = ["a", "b", "a", "c", "b", "a", "c", "d", "d"]
    rewards = [0.1, 0.5, 0.3, 0.2, 0.5, 0.8, 0.9, 0.4, 0.1]  # group b ties
    adv, keep, index, stats = group_advantages(rewards, ids)
    assert adv.dtype == torch.float32
    assert adv.tolist() == pytest.approx(ref_advantages(rewards, ids), abs=1e-6)
    assert keep.tolist() == [True, False, True, True, False, True, True, True, True]
    assert index.tolist() == [0, 1, 0, 2, 1, 0, 2, 3, 3]
    assert stats["groups"] == 4 and stats["zero_variance_groups"] == 1 and stats["samples_kept"] == 7
    assert stats["adv_max"] == pytest.approx(max(ref_advantages(rewards, ids)), abs=1e-6)
    for g in ("a", "c", "d"):  # each group: mean 0, population std 1
        values = torch.tensor([adv[i].item() for i, x in enumerate(ids) if x == g], dtype=torch.float64)
        assert values.mean().item() == pytest.approx(0, abs=1e-6)
        assert values.std(unbiased=False).item() == pytest.approx(1, abs=1e-5)


def test_global_std_advantages_of_a_nearly_tied_group():
    """Fifteen 1.0 and one 0.98: the group's own std makes the odd one -3.87; the official global
    scale (std of all the step's rewards + 1e-4) keeps it small next to a group that really differs."""
    ids = [0] * 16 + [1] * 16
    rewards = [1.0] * 15 + [0.98] + [0.0, 1.0] * 8
    by_group = group_advantages(rewards, ids)[0]
    assert by_group[15].item() == pytest.approx(-3.873, abs=1e-3)
    everything = torch.tensor(rewards, dtype=torch.float64)
    scale = math.sqrt(sum((r - everything.mean().item()) ** 2 for r in rewards) / len(rewards)) + 1e-4
    adv = group_advantages(rewards, ids, std=scale)[0]
    assert adv[15].item() == pytest.approx((0.98 - (15 + 0.98) / 16) / scale, rel=1e-5)
    assert abs(adv[15].item()) < 0.05 and adv[16].item() == pytest.approx(-0.5 / scale, rel=1e-5)


def test_group_advantages_shared_scale_and_centring_only():
    ids, rewards = [0, 0, 1, 1], [1.0, 2.0, 5.0, 9.0]
    assert group_advantages(rewards, ids, std=2.0)[0].tolist() == pytest.approx([-0.25, 0.25, -1.0, 1.0])
    assert group_advantages(rewards, ids, std="none")[0].tolist() == pytest.approx([-0.5, 0.5, -2.0, 2.0])


@pytest.mark.parametrize("shift,scale", [(3.0, 1.0), (-0.7, 1.0), (0.0, 25.0), (1.5, 0.01)])
def test_advantages_are_invariant_to_an_affine_change_of_a_groups_rewards(shift, scale):
    ids = [0] * 4 + [1] * 4
    rewards = torch.tensor([0.1, 0.4, 0.35, 0.9, 0.2, 0.2, 0.6, 0.1], dtype=torch.float64)
    changed = rewards.clone()
    changed[4:] = changed[4:] * scale + shift  # only group 1 changes
    assert torch.allclose(group_advantages(rewards, ids)[0], group_advantages(changed, ids)[0], atol=1e-5)
    # a shared scale keeps the shift invariance only
    shifted = rewards.clone()
    shifted[4:] += shift
    assert torch.allclose(group_advantages(rewards, ids, std=0.3)[0], group_advantages(shifted, ids, std=0.3)[0], atol=1e-6)


@pytest.mark.parametrize("rewards,ids,kwargs,match", [
    ([0.1, 0.2, 0.3], [0, 0, 1], {}, "group 1 has 1 sample"),
    ([0.1, 0.2, 0.3, 0.4, 0.5], [0, 0, 1, 1, 1], {"group_size": 2}, "expected group_size=2"),
    ([0.1, float("nan"), 0.3, 0.4], [0, 0, 1, 1], {}, "index 1 is nan"),
    ([0.1, 0.2, float("inf"), 0.4], [0, 0, 1, 1], {}, "index 2 is inf"),
    ([0.1, 0.2], [0, 0, 1], {}, "3 group ids but 2 rewards"),
    ([0.1, 0.2], [0, 0], {"std": 0.0}, "std must be"),
    ([0.1, 0.2], [0, 0], {"std": "batch"}, "std must be"),
])
def test_group_advantages_errors(rewards, ids, kwargs, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, ids, **kwargs)


def test_group_noise_and_sigmas_are_shared_within_a_group_and_drawn_from_its_generator():
    index = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    uniform = lambda n, g: torch.rand(n, generator=g)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    noise, sigmas = sample_group_noise_and_sigmas(index, (3, 2), gens([5, 6, 7]), uniform)
    assert noise.shape == (7, 3, 2) and sigmas.shape == (7,)
    assert torch.equal(noise[0], noise[1]) and torch.equal(noise[2], noise[4]) and not torch.equal(noise[1], noise[2])
    assert sigmas[2] == sigmas[3] == sigmas[4] and sigmas[0] != sigmas[5]
    g = torch.Generator().manual_seed(6)  # group 1's draws: its noise, then its sigma
    assert torch.equal(noise[2], torch.randn(3, 2, generator=g)) and sigmas[2] == torch.rand(1, generator=g)[0]
    alone, alone_sigma = sample_group_noise_and_sigmas(torch.tensor([0, 0]), (3, 2), gens([6]), uniform)
    assert torch.equal(alone[0], noise[2]) and alone_sigma[0] == sigmas[2]  # independent of the other groups
    with pytest.raises(ValueError, match="2 generators for 3 groups"):
        sample_group_noise_and_sigmas(index, (3, 2), gens([1, 2]), uniform)


# ---------------------------------------------------------------- DGPO

@pytest.mark.parametrize("beta,kl_weight", [(1.0, 0.0), (100.0, 0.0), (2000.0, 1e-3)])
def test_dgpo_value_and_gradient_match_a_per_group_loop(beta, kl_weight):
    target, model, ref, _, _ = batch(n=7, shape=(2, 5), seed=int(beta), spread=0.05)
    groups = torch.tensor([2, 0, 2, 0, 1, 1, 2])  # any order; sizes 3, 2, 2
    adv = torch.tensor(ref_advantages([0.3, 0.1, 0.9, 0.4, 0.2, 0.7, 0.5], groups.tolist()), dtype=torch.float32)
    value, grad = grads(lambda m: dgpo_loss(m, ref, target, adv, groups, beta, kl_weight=kl_weight), model)
    expected, expected_grad = grads(lambda m: ref_dgpo(m, ref, target, adv, groups, beta, kl_weight), model.double())
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert torch.allclose(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)
    _, metrics = dgpo_loss(model, ref, target, adv, groups, beta)
    assert all(isinstance(v, float) for v in metrics.values())


@pytest.mark.parametrize("beta,kl_weight", [(100.0, 0.02), (10.0, 1e-3)])
def test_dgpo_gradient_is_the_official_surrogates_and_so_is_the_kl_to_policy_ratio(beta, kl_weight):
    """The gradient (policy and KL parts) equals that of the official surrogate, so the KL weight
    means what the official `train.beta` means; exact_gradient multiplies the policy part by beta."""
    target, model, ref, _, _ = batch(n=8, shape=(2, 5), seed=21, spread=0.05)
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = torch.tensor(ref_advantages([0.3, 0.1, 0.9, 0.4, 0.2, 0.7, 0.5, 0.6], groups.tolist()), dtype=torch.float32)
    _, grad = grads(lambda m: dgpo_loss(m, ref, target, adv, groups, beta, kl_weight=kl_weight), model)
    _, official = grads(lambda m: official_dgpo_surrogate(m, ref, target, adv, groups, beta, kl_weight)[0], model.double())
    assert torch.allclose(grad.double(), official, rtol=1e-4, atol=1e-9)
    _, policy_grad = grads(lambda m: dgpo_loss(m, ref, target, adv, groups, beta), model)
    _, kl_grad = grads(lambda m: official_dgpo_surrogate(m, ref, target, adv, groups, beta, 1.0)[2], model.double())
    _, official_policy = grads(lambda m: official_dgpo_surrogate(m, ref, target, adv, groups, beta)[1], model.double())
    ratio = (kl_weight * kl_grad.norm() / policy_grad.double().norm()).item()
    assert ratio == pytest.approx((kl_weight * kl_grad.norm() / official_policy.norm()).item(), rel=1e-4)
    _, exact = grads(lambda m: dgpo_loss(m, ref, target, adv, groups, beta, exact_gradient=True), model)
    assert torch.allclose(exact, beta * policy_grad, rtol=1e-4, atol=1e-9)  # the previous default: KL beta x weaker


def test_dgpo_starts_at_log2_and_moves_good_samples_towards_the_target():
    target, model, ref, _, _ = batch(n=4, seed=3)
    groups, adv = torch.tensor([0, 0, 0, 0]), torch.tensor([1.5, 0.5, -0.5, -1.5])
    loss, metrics = dgpo_loss(ref.clone(), ref, target, adv, groups, 100.0)
    assert metrics["loss"] == pytest.approx(math.log(2), abs=1e-6) and metrics["implicit_acc"] == 0.0
    assert loss.item() == pytest.approx(math.log(2) / 100.0, abs=1e-8)  # the optimised value: / beta
    _, grad = grads(lambda m: dgpo_loss(m, ref, target, adv, groups, 10.0), ref)
    stepped = ref - 0.01 * grad
    before, after = [mse(ref[i], target[i]).item() for i in range(4)], [mse(stepped[i], target[i]).item() for i in range(4)]
    assert after[0] < before[0] and after[1] < before[1] and after[2] > before[2] and after[3] > before[3]


def test_dgpo_a_group_of_zero_advantages_contributes_no_gradient():
    target, model, ref, _, _ = batch(n=5, seed=4)
    groups, adv = torch.tensor([0, 0, 0, 1, 1]), torch.tensor([0.0, 0.0, 0.0, 1.0, -1.0])
    _, grad = grads(lambda m: dgpo_loss(m, ref, target, adv, groups, 100.0), model)
    assert grad[:3].abs().max() == 0 and grad[3:].abs().max() > 0


def test_dgpo_clip_stops_the_gradient_of_rows_past_the_clip_range():
    target, model, ref, old, _ = batch(n=4, seed=5)
    groups, adv = torch.tensor([0, 0, 1, 1]), torch.tensor([1.0, -1.0, 1.0, -1.0])
    old = model.clone()
    old[0] = target[0] + 2.0  # row 0: policy far better than old -> ratio >> 1 with A > 0: clipped
    value, grad = grads(lambda m: dgpo_loss(m, ref, target, adv, groups, 100.0, old_pred=old, clip_range=0.01), model)
    plain, _ = dgpo_loss(model, ref, target, adv, groups, 100.0)
    assert value.item() == pytest.approx(plain.item(), rel=1e-6)  # value unchanged
    assert grad[0].abs().max() == 0 and grad[1:].abs().max() > 0
    assert dgpo_loss(model, ref, target, adv, groups, 100.0, old_pred=old, clip_range=0.01)[1]["clip_frac"] == 0.25


# ---------------------------------------------------------------- NFT

@pytest.mark.parametrize("beta,c,kl_weight", [(0.1, 5.0, 0.0), (1.0, 5.0, 1e-4), (0.5, 1.0, 0.1)])
def test_nft_value_and_gradient_match_a_per_sample_loop(beta, c, kl_weight):
    target, model, ref, old, sigmas = batch(n=6, shape=(4, 3), seed=7)
    adv = torch.tensor([2.0, -0.3, 7.0, -9.0, 0.0, 1.1])  # includes clipped advantages
    value, grad = grads(lambda m: nft_loss(m, old, target, sigmas, adv, beta, c, ref_pred=ref, kl_weight=kl_weight), model)
    expected, expected_grad = grads(lambda m: ref_nft(m, old, target, sigmas, adv, beta, c, ref, kl_weight), model.double())
    assert value.dtype == torch.float32
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)
    _, metrics = nft_loss(model, old, target, sigmas, adv, beta, c, ref_pred=ref, kl_weight=kl_weight)
    r = (adv.clamp(-c, c) / c / 2 + 0.5).clamp(0, 1)
    assert metrics["r_mean"] == pytest.approx(r.mean().item(), abs=1e-6)


def test_nft_moves_positive_samples_towards_their_target_and_negative_ones_away():
    target, _, _, old, sigmas = batch(n=2, seed=8)
    adv = torch.tensor([5.0, -5.0])  # r = 1 and r = 0
    _, grad = grads(lambda m: nft_loss(m, old, target, sigmas, adv, 0.1, 5.0, kl_weight=0.0), old)
    stepped = old - 1e-3 * grad
    assert mse(stepped[0], target[0]) < mse(old[0], target[0])
    assert mse(stepped[1], target[1]) > mse(old[1], target[1])


# ---------------------------------------------------------------- AWM

@pytest.mark.parametrize("eps,kl_weight,old_kl_weight", [(1.0, 0.0, 0.0), (0.02, 0.003, 1.0), (0.5, 0.1, 0.0)])
def test_awm_value_and_gradient_match_a_per_sample_loop(eps, kl_weight, old_kl_weight):
    target, model, ref, old, sigmas = batch(n=6, shape=(2, 3), seed=9, spread=0.2)
    adv = torch.tensor([1.2, -0.4, 6.0, -7.0, 0.3, -1.0])
    kwargs = dict(clip_range=eps, adv_clip=5.0, advantage_max=1.0, ref_pred=ref, kl_weight=kl_weight, old_kl_weight=old_kl_weight)
    value, grad = grads(lambda m: awm_loss(m, old, target, sigmas, adv, **kwargs), model)
    expected, expected_grad = grads(lambda m: ref_awm(m, old, target, sigmas, adv, eps, 5.0, 1.0, ref, kl_weight,
                                                      old_kl_weight), model.double())
    assert value.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert torch.allclose(grad.double(), expected_grad, rtol=1e-4, atol=1e-7)
    metrics = awm_loss(model, old, target, sigmas, adv, **kwargs)[1]
    ratio = torch.tensor([torch.exp(-mse(model[i], target[i]) + mse(old[i], target[i])).item() for i in range(6)])
    assert metrics["clip_frac"] == pytest.approx(((ratio - 1).abs() > eps).float().mean().item())


def test_awm_ratio_is_to_the_rollout_likelihood_and_the_old_kl_to_old_pred():
    target, model, ref, old, sigmas = batch(n=5, seed=12)
    adv = torch.tensor([1.0, -2.0, 0.5, 3.0, -0.2])
    own = awm_log_likelihood(model, target, sigmas).detach()
    _, metrics = awm_loss(model, old, target, sigmas, adv, kl_weight=0.0, rollout_logp=own)
    assert metrics["ratio_mean"] == 1.0 and metrics["clip_frac"] == 0.0  # exactly 1 in fp32
    assert metrics["old_kl"] == pytest.approx(mse(model, old).item(), rel=1e-5)
    rollout = own - torch.tensor([0.1, 0.0, -0.2, 0.3, 0.0])
    _, metrics = awm_loss(model, old, target, sigmas, adv, kl_weight=0.0, rollout_logp=rollout)
    assert metrics["ratio_mean"] == pytest.approx(torch.exp(own - rollout).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="rollout_logp"):
        awm_loss(model, old, target, sigmas, adv, kl_weight=0.0, rollout_logp=own[:3])


def test_awm_at_the_old_policy_is_advantage_weighted_flow_matching():
    """ratio = 1: the gradient is that of mean_i(a_i * err_i), a_i = A_i / 5 (PPO clip inactive)."""
    target, _, _, old, sigmas = batch(n=4, seed=10)
    adv = torch.tensor([2.0, -1.0, 0.5, -1.5])
    _, grad = grads(lambda m: awm_loss(m, old, target, sigmas, adv, clip_range=0.2, kl_weight=0.0, old_kl_weight=0.0), old)
    _, expected = grads(lambda m: sum((adv[i] / 5) * mse(m[i], target[i]) for i in range(4)) / 4, old.double())
    assert torch.allclose(grad.double(), expected, rtol=1e-4, atol=1e-8)
    assert awm_loss(old, old, target, sigmas, adv, kl_weight=0.0)[1]["clip_frac"] == 0.0


def test_awm_weightings():
    target, model, _, _, sigmas = batch(n=3, seed=11)
    err = torch.stack([mse(model[i], target[i]) for i in range(3)]).float()
    assert torch.allclose(awm_log_likelihood(model, target, sigmas, "uniform"), -err)
    assert torch.allclose(awm_log_likelihood(model, target, sigmas, "t"), -sigmas * err)
    p = 0.25
    expected = -sigmas * ((err + 1e-10) ** p - 1e-10 ** p) / p
    assert torch.allclose(awm_log_likelihood(model, target, sigmas, "ghuber", p), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="weighting"):
        awm_log_likelihood(model, target, sigmas, "huber2")


def test_awm_default_weighting_is_the_official_ghuber_at_given_t():
    """Official AWM OCR recipe (config/dgx_awm.py: train.weighting 'ghuber', ghuber_power 0.25) and its
    compute_log_prob_awm written out in float64: log_prob = -mean((v - (noise - x0))^2), then
    -((-log_prob + 1e-10)^p - (1e-10)^p) * t / p, at t = 0.1, 0.5 and 0.9 for known errors."""
    import train_online_dpo

    assert train_online_dpo.Config.awm_weighting == "ghuber" and train_online_dpo.Config.awm_old_kl_weight == 1.0
    t = torch.tensor([0.1, 0.5, 0.9])
    target = torch.zeros(3, 4, 8)
    pred = torch.stack([torch.full((4, 8), v) for v in (0.5, 1.0, 2.0)])  # per-sample mse 0.25, 1, 4
    mse_by_hand = torch.tensor([0.25, 1.0, 4.0], dtype=torch.float64)
    official = -((mse_by_hand + 1e-10) ** 0.25 - 1e-10 ** 0.25) * t.double() / 0.25
    floor = 10 ** -2.5  # (1e-10) ** 0.25
    assert official.tolist() == pytest.approx([-0.1 * (0.25 ** 0.25 - floor) / 0.25, -0.5 * (1 - floor) / 0.25,
                                               -0.9 * (4 ** 0.25 - floor) / 0.25], rel=1e-6)
    assert torch.allclose(awm_log_likelihood(pred, target, t, "ghuber").double(), official, rtol=1e-6)


# ---------------------------------------------------------------- invariances through the helper

@pytest.mark.parametrize("loss_name", ["dgpo", "nft", "awm"])
def test_losses_are_invariant_to_an_affine_change_of_a_groups_rewards(loss_name):
    target, model, ref, old, sigmas = batch(n=6, seed=12)
    ids = [0, 0, 0, 1, 1, 1]
    rewards = torch.tensor([0.2, 0.5, 0.9, 0.3, 0.1, 0.4], dtype=torch.float64)
    changed = rewards.clone()
    changed[3:] = 7.0 * changed[3:] - 2.0

    def loss(r):
        adv, keep, index, _ = group_advantages(r, ids)
        if loss_name == "dgpo":
            return grads(lambda m: dgpo_loss(m, ref, target, adv, index, 100.0), model)
        if loss_name == "nft":
            return grads(lambda m: nft_loss(m, old, target, sigmas, adv, ref_pred=ref), model)
        return grads(lambda m: awm_loss(m, old, target, sigmas, adv, ref_pred=ref), model)

    (a, ga), (b, gb) = loss(rewards), loss(changed)
    assert a.item() == pytest.approx(b.item(), rel=1e-5) and torch.allclose(ga, gb, rtol=1e-4, atol=1e-8)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("call,match", [
    (lambda t, m, r, o, s, a, g: dgpo_loss(m, r[:, :2], t, a, g), "differ in shape"),
    (lambda t, m, r, o, s, a, g: dgpo_loss(m, r, t, a[:3], g), "advantages"),
    (lambda t, m, r, o, s, a, g: dgpo_loss(m, r, t, a * float("nan"), g), "finite"),
    (lambda t, m, r, o, s, a, g: dgpo_loss(m, r, t, a, g, beta=0.0), "beta"),
    (lambda t, m, r, o, s, a, g: dgpo_loss(m, r, t, a, g, beta=float("inf")), "beta"),
    (lambda t, m, r, o, s, a, g: dgpo_loss(m, r, t, a, g, kl_weight=-1.0), "kl_weight"),
    (lambda t, m, r, o, s, a, g: nft_loss(m, o, t, s, a, beta=0.0), "beta"),
    (lambda t, m, r, o, s, a, g: nft_loss(m, o, t, s[:2], a), "sigmas"),
    (lambda t, m, r, o, s, a, g: nft_loss(m, o, t, s, a, kl_weight=1e-4), "needs ref_pred"),
    (lambda t, m, r, o, s, a, g: nft_loss(m, o, t, s, a, adv_clip=-1.0), "adv_clip"),
    (lambda t, m, r, o, s, a, g: awm_loss(m, o, t, s, a, clip_range=0.0, ref_pred=r), "clip_range"),
    (lambda t, m, r, o, s, a, g: awm_loss(m, o, t, s, a), "needs ref_pred"),
    (lambda t, m, r, o, s, a, g: awm_loss(m, o, t, s, a, ref_pred=r, weighting="x"), "weighting"),
    (lambda t, m, r, o, s, a, g: awm_loss(m[:0], o[:0], t[:0], s[:0], a[:0], ref_pred=r[:0]), "empty batch"),
])
def test_loss_errors(call, match):
    target, model, ref, old, sigmas = batch(n=4, seed=13)
    adv, groups = torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=match):
        call(target, model, ref, old, sigmas, adv, groups)


def test_bf16_inputs_are_computed_in_fp32():
    target, model, ref, old, sigmas = batch(n=4, shape=(8, 16), seed=14)
    adv, groups = torch.tensor([1.0, -1.0, 0.5, -0.5]), torch.tensor([0, 0, 1, 1])
    for fn in (lambda *x: dgpo_loss(x[0], x[1], x[3], adv, groups),
               lambda *x: nft_loss(x[0], x[2], x[3], sigmas, adv, ref_pred=x[1]),
               lambda *x: awm_loss(x[0], x[2], x[3], sigmas, adv, ref_pred=x[1])):
        low = fn(model.bfloat16(), ref.bfloat16(), old.bfloat16(), target.bfloat16())[0]
        high = fn(model.bfloat16().float(), ref.bfloat16().float(), old.bfloat16().float(), target.bfloat16().float())[0]
        assert low.dtype == torch.float32 and low.item() == pytest.approx(high.item(), rel=1e-6)
