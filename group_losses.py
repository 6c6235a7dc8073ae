"""Group-wise objectives for flow-matching models: DGPO, DiffusionNFT and AWM, with the shared
group-advantage helper. Torch only; imports nothing from this project (copy it alone).

Conventions (shared with dpo_loss.py)
-------------------------------------
- One row per rollout sample. A "group" is the K samples of one prompt; `group_index` [N] (long)
  says which group a row belongs to (any order; `group_advantages` makes one from arbitrary ids).
- Flow matching: x_s = (1 - s) * x0 + s * e, target v* = e - x0; `sigmas` [N] are the s of each row.
- err(v) = mean over every non-batch dim of (v - v*)^2, in fp32 (dpo_loss.per_sample_mse).
- `model_pred` carries the gradient; `ref_pred` (frozen reference: LoRA disabled) and `old_pred`
  (the "old" / EMA policy: a second LoRA adapter) are predictions made under no_grad and are
  detached here anyway. Any float dtype in, fp32 math, fp32 scalar loss out.
- Every loss returns (loss, metrics): loss is the MEAN over its units (groups for DGPO, samples for
  NFT and AWM), so a trainer that splits a batch over micro-batches or ranks weights each call by
  its units / all units; metrics are detached python floats (means over the units of the call).

Advantages (`group_advantages`): A_i = (r_i - mean_g) / scale, scale the population std of the
group (`std="group"`) or one shared scale (a float). A group whose rewards are all equal ("tied")
has A = 0 for its samples and `keep` False, and is counted in `zero_variance_groups`; whether it is
trained is the caller's choice. The official DGPO / NFT / AWM scripts keep tied groups (they count
in the mean; NFT still pulls them towards the old policy, AWM and DGPO still apply their KL
terms), and their OCR recipes normalise by the std of ALL rewards of the step plus 1e-4
(`sample.global_std = True`; flow_grpo/stat_tracking.py `np.std(rewards) + 1e-4`): pass that scale
as a float `std`. The per-group std makes a group's advantages invariant to an affine change of
its rewards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F


def _key(g):
    return g.item() if isinstance(g, torch.Tensor) else g


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, ...] -> [N]: mean over every non-batch dim of (pred - target)^2, in fp32."""
    diff = pred.float() - target.float()
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def group_advantages(rewards, group_ids: Sequence | torch.Tensor, std: str | float = "group",
                     group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """-> (advantages [N] fp32, keep [N] bool, group_index [N] long, stats).

    advantages: (r - group mean) / scale, scale = the group's population std (`std="group"`), or a
    given positive float shared by all groups (e.g. the std of every reward of the step, as the
    official recipes do), or 1 (`std="none"`: centred only). Zero-variance groups: A = 0, keep False.
    group_index: dense group numbers 0..G-1 in order of first appearance.
    stats: groups, zero_variance_groups, samples_kept, adv_abs_mean, adv_max, adv_min.
    Errors: a group of fewer than 2 samples, groups of unequal size when `group_size` is given (or a
    size other than it), non-finite rewards, a non-positive or non-finite `std`.
    """
    rewards = torch.as_tensor(rewards).detach().to("cpu", torch.float64).reshape(-1)
    if len(group_ids) != rewards.numel():
        raise ValueError(f"{len(group_ids)} group ids but {rewards.numel()} rewards")
    bad = torch.nonzero(~torch.isfinite(rewards)).flatten()
    if bad.numel():
        raise ValueError(f"reward at index {int(bad[0])} is {rewards[bad[0]].item()}: rewards must be finite")
    if isinstance(std, str):
        if std not in ("group", "none"):
            raise ValueError(f"std must be 'group', 'none' or a positive float, got {std!r}")
    elif not (math.isfinite(std) and std > 0):
        raise ValueError(f"std must be 'group', 'none' or a positive float, got {std!r}")
    members: dict = {}
    for i, g in enumerate(group_ids):
        members.setdefault(_key(g), []).append(i)
    for g, rows in members.items():
        if len(rows) < 2:
            raise ValueError(f"group {g!r} has {len(rows)} sample: a group needs at least 2 to compare")
        if group_size is not None and len(rows) != group_size:
            raise ValueError(f"group {g!r} has {len(rows)} samples, expected group_size={group_size}")
    advantages = torch.zeros_like(rewards)
    keep = torch.zeros(rewards.numel(), dtype=torch.bool)
    group_index = torch.zeros(rewards.numel(), dtype=torch.long)
    zero_variance = 0
    for number, rows in enumerate(members.values()):
        index = torch.tensor(rows)
        group_index[index] = number
        r = rewards[index]
        if bool((r == r[0]).all()):
            zero_variance += 1
            continue
        scale = r.std(unbiased=False) if std == "group" else (1.0 if std == "none" else float(std))
        advantages[index] = (r - r.mean()) / scale
        keep[index] = True
    kept = advantages[keep]
    stats = {"groups": float(len(members)), "zero_variance_groups": float(zero_variance),
             "samples_kept": float(keep.sum()),
             "adv_abs_mean": kept.abs().mean().item() if kept.numel() else 0.0,
             "adv_max": kept.max().item() if kept.numel() else 0.0,
             "adv_min": kept.min().item() if kept.numel() else 0.0}
    return advantages.float(), keep, group_index, stats


def sample_group_noise_and_sigmas(group_index: torch.Tensor, shape: Sequence[int], generators: Sequence[torch.Generator],
                                  sigma_sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """One Gaussian noise [*shape] and one sigma per GROUP, shared by its rows -> (noise [N, *shape],
    sigmas [N]) on the CPU. Group g draws from generators[g] (its noise, then its sigma), so a
    group's draws do not depend on which other groups share the batch (or the rank). Sharing them
    inside a group compares its samples at the same point of the forward process (DGPO's
    `use_shared_noise`; Diffusion-DPO shares them within a pair).
    `sigma_sampler(n, generator)` -> n sigmas in (0, 1)."""
    n_groups = int(group_index.max()) + 1 if group_index.numel() else 0
    if len(generators) != n_groups:
        raise ValueError(f"{len(generators)} generators for {n_groups} groups")
    noise = torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in generators]) \
        if n_groups else torch.zeros((0, *shape))
    sigmas = torch.cat([sigma_sampler(1, g).float().reshape(1) for g in generators]) if n_groups else torch.zeros(0)
    return noise[group_index.cpu()], sigmas[group_index.cpu()]


def _check(model_pred, others, target, advantages, name):
    for other in others:
        if other is not None and other.shape != target.shape:
            raise ValueError(f"{name}: prediction {tuple(other.shape)} and target {tuple(target.shape)} differ in shape")
    if model_pred.shape != target.shape:
        raise ValueError(f"{name}: model_pred {tuple(model_pred.shape)} and target {tuple(target.shape)} differ in shape")
    if target.dim() < 1 or target.shape[0] == 0:
        raise ValueError(f"{name}: empty batch")
    if advantages.shape != (target.shape[0],):
        raise ValueError(f"{name}: advantages {tuple(advantages.shape)} must be [{target.shape[0]}] (one per row)")
    if not torch.isfinite(advantages).all():
        raise ValueError(f"{name}: advantages must be finite")


def _check_sigmas_and_reference(sigmas, target, kl_weight, ref_pred, name):
    """The per-sample losses (NFT, AWM): one sigma per row, and the reference when its KL is on."""
    if sigmas.shape != (target.shape[0],):
        raise ValueError(f"{name}: sigmas {tuple(sigmas.shape)} must be [{target.shape[0]}]")
    if kl_weight > 0 and ref_pred is None:
        raise ValueError(f"{name}: kl_weight > 0 needs ref_pred")


def _positive(value, name):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _non_negative(value, name):
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


# ----------------------------------------------------------------------------------------------
# DGPO


def dgpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, advantages: torch.Tensor,
              group_index: torch.Tensor, beta: float = 100.0, kl_weight: float = 0.0,
              old_pred: torch.Tensor | None = None, clip_range: float = 0.0,
              exact_gradient: bool = False) -> tuple[torch.Tensor, dict]:
    """Direct Group Preference Optimization (Luo, Hu, Tang, arXiv 2510.08425), flow-matching form.

    The group's above-mean samples form G+ and its below-mean samples G-; the group-level implicit
    reward is R(G) = sum_{i in G} |A_i| rho_i with the DPO implicit reward of a sample
    rho_i = -beta (err_model_i - err_ref_i). As the advantages of a group sum to 0, the weights of G+
    and G- are equal and the partition function cancels, so

        z_g    = (1 / K_g) * sum_{i in g} A_i * rho_i            per group (K_g rows of group g)
        loss_g = -logsigmoid(z_g)                                per group
        loss   = (1 / beta) * mean over groups of loss_g + kl_weight * mean over rows of mean((v_model - v_ref)^2)

    Per sample: A_i, err_model_i, err_ref_i, rho_i. Per group: z_g, loss_g. Units: groups (every
    group of the call must be WHOLE: z_g needs all its rows). The 1/K_g and the absence of a 0.5
    factor follow the official code (`compute_group_dgpo_loss_allreduce`: advantages * beta_dpo *
    (dsm - ref_dsm) / group_size). Its loss is the surrogate mean_i sigmoid(-z_g).detach() * A_i * err_i,
    whose gradient is that of mean_g -logsigmoid(z_g) divided by beta: the 1/beta above makes the
    gradient the official one, so `kl_weight` (the official `train.beta`) weighs the KL against the
    policy term as it does there. `exact_gradient=True` drops the 1/beta (the -logsigmoid's own
    gradient, beta times the official: the KL then counts beta times less). The reported
    metrics["loss"] is mean_g -logsigmoid(z_g) either way (log 2 at the start).

    Optional PPO-style clip (the official `clip_dsm`, with an EMA "old" policy): a row whose ratio
    exp(err_old - err_model) is above 1 + clip_range with A > 0, or below 1 - clip_range with A <= 0,
    contributes its value but no gradient. clip_range 0 (or no old_pred) disables it.

    Defaults and sources: beta 100 (official README / config/dgpo.py `train.beta_dpo`, "10 ~ 100"
    with a frozen reference); kl_weight 0 here (README mode 1: `train.beta` 1e-3; the OCR config
    uses 0.02); clip_range 0 here (official OCR config 1e-2, with its EMA reference).
    Metrics' "loss" is the -logsigmoid mean (not divided by beta).
    Metrics: loss, kl, implicit_acc (fraction of groups with z_g > 0), z_mean, implicit rewards of
    the above-mean / below-mean rows (reward_pos, reward_neg), clip_frac.
    """
    _check(model_pred, (ref_pred, old_pred), target, advantages, "dgpo_loss")
    _positive(beta, "beta")
    _non_negative(kl_weight, "kl_weight")
    _non_negative(clip_range, "clip_range")
    group_index = group_index.to(target.device).long()
    advantages = advantages.to(target.device).float()
    model_err = per_sample_mse(model_pred, target)  # [N]
    ref_err = per_sample_mse(ref_pred.detach(), target)  # [N]
    clipped = torch.zeros_like(model_err, dtype=torch.bool)
    if old_pred is not None and clip_range > 0:
        with torch.no_grad():
            ratio = torch.exp(per_sample_mse(old_pred.detach(), target) - model_err)
            clipped = torch.where(advantages > 0, ratio > 1 + clip_range, ratio < 1 - clip_range)
        model_err = torch.where(clipped, model_err.detach(), model_err)
    implicit_reward = -beta * (model_err - ref_err)  # rho_i, [N]
    groups, dense = torch.unique(group_index, return_inverse=True)
    n_groups = groups.numel()
    sizes = torch.zeros(n_groups, device=target.device).index_add_(0, dense, torch.ones_like(advantages))
    z = torch.zeros(n_groups, device=target.device).index_add_(0, dense, advantages * implicit_reward) / sizes
    loss = -F.logsigmoid(z).mean()
    policy = loss if exact_gradient else loss / beta  # official gradient scale (see above)
    kl = per_sample_mse(model_pred, ref_pred.detach()).mean()
    total = policy + kl_weight * kl if kl_weight > 0 else policy
    with torch.no_grad():
        pos, neg = advantages > 0, advantages < 0
        metrics = {
            "loss": loss.item(), "kl": kl.item(),
            "implicit_acc": (z > 0).float().mean().item(), "z_mean": z.mean().item(),
            "reward_pos": implicit_reward[pos].mean().item() if pos.any() else 0.0,
            "reward_neg": implicit_reward[neg].mean().item() if neg.any() else 0.0,
            "clip_frac": clipped.float().mean().item(),
        }
    return total, metrics


# ----------------------------------------------------------------------------------------------
# DiffusionNFT


def nft_loss(model_pred: torch.Tensor, old_pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor,
             advantages: torch.Tensor, beta: float = 0.1, adv_clip: float = 5.0, ref_pred: torch.Tensor | None = None,
             kl_weight: float = 1e-4) -> tuple[torch.Tensor, dict]:
    """DiffusionNFT (Zheng et al., arXiv 2509.16117): negative-aware fine-tuning on the forward process.

    Per sample i (sigma s_i, advantage A_i):
        r_i   = clip(clip(A_i, -c, c) / (2 c) + 1/2, 0, 1)            optimality probability
        v+    = beta * v_model + (1 - beta) * v_old                    implicit positive policy
        v-    = (1 + beta) * v_old - beta * v_model                    implicit negative policy
        d(v)  = s_i * (v* - v)       the x0-prediction error of v: x0_hat = x_s - s v, x0_hat - x0 = d(v)
        L(v)  = mean(d(v)^2) / sg(max(mean|d(v)|, 1e-5))               adaptive weighting (detached)
        loss_i = c * (r_i * L(v+) + (1 - r_i) * L(v-)) / beta
    loss = mean over rows of loss_i + kl_weight * mean over rows of mean((v_model - v_ref)^2).

    So the policy moves towards positive samples' targets through v+ and away from negative ones'
    through v- (v- mirrors v+ around v_old). Units: samples. v_old is the "old" policy (an EMA of the
    trained weights, as a second adapter) and is detached.

    Defaults and sources (official code, scripts/train_nft_sd3.py and config/nft.py `sd3_ocr`):
    beta 0.1 (`config.beta` for OCR; 1.0 for the other tasks), c = adv_clip 5 (`train.adv_clip_max`,
    also the loss scale `policy_loss * adv_clip_max`), kl_weight 1e-4 (`train.beta`; reference = LoRA
    disabled), adaptive-weight floor 1e-5 (`.clip(min=0.00001)`).
    Metrics: loss (policy part), kl, r_mean, loss_pos (mean L(v+)), loss_neg (mean L(v-)),
    old_deviation (mean (v_model - v_old)^2).
    """
    _check(model_pred, (old_pred, ref_pred), target, advantages, "nft_loss")
    _positive(beta, "beta")
    _positive(adv_clip, "adv_clip")
    _non_negative(kl_weight, "kl_weight")
    _check_sigmas_and_reference(sigmas, target, kl_weight, ref_pred, "nft_loss")
    model, old, v_star = model_pred.float(), old_pred.detach().float(), target.float()
    advantages = advantages.to(target.device).float()
    s = sigmas.to(target.device).float().view(-1, *([1] * (target.dim() - 1)))
    r = (advantages.clamp(-adv_clip, adv_clip) / (2 * adv_clip) + 0.5).clamp(0, 1)  # [N]

    def weighted_x0_error(v):  # [N]
        d = s * (v_star - v)
        scale = d.detach().abs().reshape(d.shape[0], -1).mean(dim=1).clamp(min=1e-5)
        return d.pow(2).reshape(d.shape[0], -1).mean(dim=1) / scale

    positive = weighted_x0_error(beta * model + (1 - beta) * old)
    negative = weighted_x0_error((1 + beta) * old - beta * model)
    policy = adv_clip * (r * positive + (1 - r) * negative) / beta
    loss = policy.mean()
    kl = per_sample_mse(model, ref_pred.detach()).mean() if ref_pred is not None else torch.zeros((), device=loss.device)
    total = loss + kl_weight * kl if kl_weight > 0 else loss
    with torch.no_grad():
        metrics = {"loss": loss.item(), "kl": kl.item(), "r_mean": r.mean().item(),
                   "loss_pos": positive.mean().item(), "loss_neg": negative.mean().item(),
                   "old_deviation": per_sample_mse(model, old).mean().item()}
    return total, metrics


# ----------------------------------------------------------------------------------------------
# AWM

AWM_WEIGHTINGS = ("uniform", "t", "ghuber")


def awm_log_likelihood(pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor, weighting: str = "uniform",
                       ghuber_power: float = 0.25) -> torch.Tensor:
    """[N]: the flow-matching log-likelihood proxy of AWM, -w(err), err = per_sample_mse(pred, target):
    "uniform": -err; "t": -s * err; "ghuber": -s * ((err + 1e-10)^p - (1e-10)^p) / p (a robust,
    generalised-Huber weighting; official `compute_log_prob_awm`, p = `ghuber_power`)."""
    err = per_sample_mse(pred, target)
    s = sigmas.to(err.device).float()
    if weighting == "uniform":
        return -err
    if weighting == "t":
        return -s * err
    if weighting == "ghuber":
        _positive(ghuber_power, "ghuber_power")
        return -s * ((err + 1e-10).pow(ghuber_power) - 1e-10 ** ghuber_power) / ghuber_power
    raise ValueError(f"weighting must be one of {AWM_WEIGHTINGS}, got {weighting!r}")


def awm_loss(model_pred: torch.Tensor, old_pred: torch.Tensor, target: torch.Tensor, sigmas: torch.Tensor,
             advantages: torch.Tensor, clip_range: float = 1.0, adv_clip: float = 5.0, advantage_max: float = 1.0,
             weighting: str = "uniform", ghuber_power: float = 0.25, ref_pred: torch.Tensor | None = None,
             kl_weight: float = 0.003, old_kl_weight: float = 1.0,
             rollout_logp: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Advantage Weighted Matching (Xue et al., arXiv 2509.25050): policy-gradient RL whose
    log-likelihood is the (weighted) flow-matching loss on the rollout's clean sample.

    Per sample i:
        l_i     = awm_log_likelihood(v_model)_i
        ratio_i = exp(l_i - l_roll_i)      l_roll_i: the same under the policy that sampled the rollouts
        a_i     = clip(A_i, -c, c) / c * advantage_max
        pg_i    = max(-a_i * ratio_i, -a_i * clip(ratio_i, 1 - eps, 1 + eps))       PPO-style clip
    loss = mean_i pg_i + kl_weight * mean_i mean((v_model - v_ref)^2)
                       + old_kl_weight * mean_i mean((v_model - v_old)^2)
    At v_model = v_old the gradient is -a_i * grad l_i: the flow-matching loss of each sample is
    weighted by its advantage (lowered for good samples, raised for bad ones). Units: samples.

    The ratio's denominator: `rollout_logp` [N] (detached), the likelihood under the policy that
    produced the rollouts. The official OCR recipe is on-policy (`train.off_policy = False`): its
    `old_log_probs` are the trained weights' before the batch's first optimizer step (the first
    step uses the current log-prob detached: ratio exactly 1). None: the old (EMA) prediction
    `old_pred` is the denominator (the official off-policy mode, where that EMA also sampled).
    `old_pred` is always the old-KL term's policy.

    Defaults and sources (official code, scripts/train_sd3_awm.py and config/dgx_awm.py
    `ocr_sd3_no_cfg_1node`): eps = clip_range 1 (`train.clip_range`), c = adv_clip 5
    (`train.adv_clip_max`), advantage_max 1 (`train.advantage_max`), loss_type "exp_first" (one
    ratio per sample and timestep, as here), kl_weight 0.003 (`train.beta`, "Uniform" KL to the
    LoRA-disabled reference), old_kl_weight 1 (`train.ema_beta`, KL to the EMA adapter). The
    official OCR recipe weights with "ghuber", p = 0.25 (the trainer's default); this function's
    default is "uniform", the plain flow-matching loss (the paper's main form).
    Metrics: loss (policy part), kl, old_kl, ratio_mean, clip_frac (|ratio - 1| > eps), logp_mean.
    """
    _check(model_pred, (old_pred, ref_pred), target, advantages, "awm_loss")
    _positive(clip_range, "clip_range")
    _positive(adv_clip, "adv_clip")
    _positive(advantage_max, "advantage_max")
    _non_negative(kl_weight, "kl_weight")
    _non_negative(old_kl_weight, "old_kl_weight")
    _check_sigmas_and_reference(sigmas, target, kl_weight, ref_pred, "awm_loss")
    advantages = advantages.to(target.device).float()
    logp = awm_log_likelihood(model_pred, target, sigmas, weighting, ghuber_power)
    if rollout_logp is None:
        with torch.no_grad():
            rollout_logp = awm_log_likelihood(old_pred.detach(), target, sigmas, weighting, ghuber_power)
    elif rollout_logp.shape != logp.shape:
        raise ValueError(f"awm_loss: rollout_logp {tuple(rollout_logp.shape)} must be [{logp.shape[0]}]")
    ratio = torch.exp(logp - rollout_logp.detach().to(logp.device).float())
    a = advantages.clamp(-adv_clip, adv_clip) / adv_clip * advantage_max
    policy = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range))
    loss = policy.mean()
    kl = per_sample_mse(model_pred, ref_pred.detach()).mean() if ref_pred is not None else torch.zeros((), device=loss.device)
    old_kl = per_sample_mse(model_pred, old_pred.detach()).mean()
    total = loss
    if kl_weight > 0:
        total = total + kl_weight * kl
    if old_kl_weight > 0:
        total = total + old_kl_weight * old_kl
    with torch.no_grad():
        metrics = {"loss": loss.item(), "kl": kl.item(), "old_kl": old_kl.item(), "ratio_mean": ratio.mean().item(),
                   "clip_frac": ((ratio - 1).abs() > clip_range).float().mean().item(), "logp_mean": logp.mean().item()}
    return total, metrics


def stratified_sampler_indices(n_steps: int, strata: int, fraction: float, u: torch.Tensor) -> torch.Tensor:
    """AWM's `time_type = "discrete_wo_init"` (scripts/train_sd3_awm.py): the sampler's step indices
    1 .. int(n_steps * fraction) split into `strata` intervals (boundaries linspace(1, top, strata + 1)
    floored); u [strata] in [0, 1) picks one index in each -> long [strata]."""
    boundaries = torch.linspace(1, int(n_steps * fraction), strata + 1)
    lower, upper = boundaries[:-1].long(), boundaries[1:].long()
    return lower + (u * (upper - lower)).long()


def first_steps_available(n_steps: int, fraction: float) -> int:
    """DGPO: how many of the sampler's first steps it trains on: int(n_steps * fraction) + 1 (official
    config/dgpo.py `trunc_steps = 6` of 10 steps, indices 0..trunc_steps: fraction 0.6)."""
    return max(1, min(n_steps, int(n_steps * fraction) + 1))
