"""Flow-matching Diffusion-DPO loss (Wallace et al., CVPR 2024, adapted to rectified flow). Torch only.

Conventions
-----------
Batch layout: chosen and rejected are interleaved, row 2i is pair i's chosen ("w") sample and row
2i+1 its rejected ("l") sample. Both rows of a pair share the same noise e and the same sigma s.

Flow matching (Qwen-Image, SD3, FLUX):
    x_s    = (1 - s) * x0 + s * e           `noisy_latents`
    v      = e - x0                         `velocity_target`
    err(x) = mean over all non-batch dims of (v_pred(x_s, s, c) - v)^2, in fp32

Loss, per pair:
    inside = -0.5 * beta * ((err_model(w) - err_ref(w)) - (err_model(l) - err_ref(l)))
    loss   = -logsigmoid(inside), averaged over pairs

so the loss falls when the policy's error drops on the chosen sample (relative to the frozen
reference) and rises on the rejected one. The implicit reward of a sample is
-0.5 * beta * (err_model - err_ref); "implicit accuracy" is the fraction of pairs whose chosen
implicit reward is strictly larger than the rejected one (inside > 0).

About beta (the same symbol means different things in different repos):
- here the 0.5 is part of the formula and the error is a *mean* over latent elements, as in the
  original Diffusion-DPO code (Salesforce, `scale_term = -0.5 * beta_dpo`);
- the diffusers research example (`examples/research_projects/diffusion_dpo`) has no 0.5 factor:
  `-logsigmoid(beta * (ref_diff - model_diff))`, so its beta = 2500 equals beta = 5000 here;
- the online Qwen-Image OCR recipe (VeRL-Omni) uses beta = 100 in exactly this form;
- 2000 is the generic default here for offline DPO on human preference pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_s = (1 - s) * x0 + s * e, with sigmas [B] broadcast over the non-batch dims."""
    s = sigmas.to(latents.dtype).view(-1, *([1] * (latents.dim() - 1)))
    return (1.0 - s) * latents + s * noise


def velocity_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The rectified-flow velocity d x_s / d s = e - x0."""
    return noise - latents


def per_sample_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[B, ...] -> [B]: mean over every non-batch dim of (pred - target)^2, in fp32."""
    diff = pred.float() - target.float()
    return diff.pow(2).reshape(diff.shape[0], -1).mean(dim=1)


def _check(model_pred, ref_pred, target, beta):
    if not (isinstance(beta, (int, float)) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
    if model_pred.shape != target.shape or ref_pred.shape != target.shape:
        raise ValueError(f"model_pred {tuple(model_pred.shape)}, ref_pred {tuple(ref_pred.shape)} and "
                         f"target {tuple(target.shape)} must have the same shape")
    if target.dim() < 1 or target.shape[0] == 0 or target.shape[0] % 2:
        raise ValueError(f"batch must hold whole (chosen, rejected) pairs: got {target.shape[0] if target.dim() else 0} "
                         "rows, need an even, non-zero number")


def diffusion_dpo_loss(model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor,
                       beta: float, pair_weights: torch.Tensor | None = None,
                       rejected_scale: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The Diffusion-DPO loss on an interleaved [c0, r0, c1, r1, ...] batch of shape [2P, ...].

    model_pred carries the gradient; ref_pred (the frozen reference) should be computed under
    no_grad and target is `velocity_target(latents, noise)`. Any float dtype; math in fp32.
    pair_weights [P] (optional): the loss is mean(w_i * loss_i) (`margin_pair_weights`).
    rejected_scale: a scalar (float or 0-dim tensor, no gradient) multiplying the gradient that
    flows through the rejected sample's error, its value unchanged (`winner_preserving_scale`).
    Returns (loss: fp32 scalar, metrics: detached python floats).
    """
    _check(model_pred, ref_pred, target, beta)
    model_err = per_sample_mse(model_pred, target)  # [2P]
    ref_err = per_sample_mse(ref_pred.detach(), target)  # [2P]
    model_w, model_l = model_err[0::2], model_err[1::2]  # [P] each
    ref_w, ref_l = ref_err[0::2], ref_err[1::2]
    if not (isinstance(rejected_scale, (int, float)) and rejected_scale == 1.0):
        # the official Diffusion-SDPO form: same value, gradient through the rejected error scaled
        model_l = model_l.detach() + rejected_scale * (model_l - model_l.detach())

    chosen_reward = -0.5 * beta * (model_w - ref_w)  # implicit rewards, [P]
    rejected_reward = -0.5 * beta * (model_l - ref_l)
    inside = chosen_reward - rejected_reward
    per_pair = -F.logsigmoid(inside)
    if pair_weights is not None:
        if pair_weights.shape != per_pair.shape:
            raise ValueError(f"pair_weights {tuple(pair_weights.shape)} must have one weight per pair ({per_pair.shape[0]})")
        per_pair = per_pair * pair_weights.detach().to(per_pair)
    loss = per_pair.mean()

    with torch.no_grad():
        metrics = {
            "implicit_acc": (inside > 0).float().mean().item(),
            "reward_chosen": chosen_reward.mean().item(),
            "reward_rejected": rejected_reward.mean().item(),
            "reward_margin": inside.mean().item(),
            "inside_mean": inside.mean().item(),
            "model_err_chosen": model_w.mean().item(),
            "model_err_rejected": model_l.mean().item(),
            "ref_err_chosen": ref_w.mean().item(),
            "ref_err_rejected": ref_l.mean().item(),
            "velocity_norm_ratio": velocity_norm_ratio(model_pred.detach(), ref_pred).mean().item(),
        }
    return loss, metrics


def flow_matching_sft_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain flow-matching loss (what DPO is benchmarked against): mean of per-sample errors."""
    return per_sample_mse(model_pred, target).mean()


def chosen_sft_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """RPO's extra term (Liu et al., arXiv 2404.19733: DPO plus the chosen sample's NLL; here the
    flow-matching loss): [2P, ...] interleaved -> [P], err_model(w) of each pair, fp32, with gradient."""
    return per_sample_mse(model_pred[0::2], target[0::2])


def velocity_norm_ratio(model_pred: torch.Tensor, ref_pred: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """[B, ...] x 2 -> [B]: ||v_model|| / ||v_ref|| per row (L2 over every non-batch dim, fp32), with
    gradient through model_pred only. 1 means the policy's velocity has the reference's length."""
    model_norm = model_pred.float().reshape(model_pred.shape[0], -1).norm(dim=1)
    ref_norm = ref_pred.detach().float().reshape(ref_pred.shape[0], -1).norm(dim=1)
    return model_norm / ref_norm.clamp_min(eps)


def norm_guard_penalty(model_pred: torch.Tensor, ref_pred: torch.Tensor, tolerance: float) -> torch.Tensor:
    """[B, ...] x 2 -> [B]: relu(||v_model|| / ||v_ref|| - 1 - tolerance)^2 per row: zero while the
    policy's velocity is at most (1 + tolerance) times the reference's length, then a quadratic
    hinge that pulls an inflated velocity back (the inflation NormGuard reports under preference
    training). One-sided: a shorter velocity is not penalised."""
    return F.relu(velocity_norm_ratio(model_pred, ref_pred) - 1.0 - tolerance).pow(2)


def winner_preserving_scale(model_pred: torch.Tensor, target: torch.Tensor, mu: float = 0.0,
                            max_scale: float = 1.0, eps: float = 1e-9) -> torch.Tensor:
    """Diffusion-SDPO's adaptive scale of the rejected (loser) gradient (Fu et al., arXiv
    2511.03317; official train.py `get_adaptive_lose_l_scale`): with the output-space gradients
    gA = d mean((pred_w - t_w)^2) / d pred_w and gB = d mean((pred_l - t_l)^2) / d pred_l over the
    batch's chosen / rejected rows, the update keeps the chosen error non-increasing to first order
    when  lambda <= (1 - mu) ||gA||^2 / (gB . gA)  (needed only when gB . gA > 0). Returns that bound
    clamped to [0, max_scale] (max_scale when gB . gA <= 0): a detached fp32 0-dim tensor, one per
    batch as in the official code. [2P, ...] interleaved input."""
    if not 0.0 <= mu <= 1.0:
        raise ValueError(f"mu must be in [0, 1], got {mu}")
    with torch.no_grad():
        diff = model_pred.detach().float() - target.float()
        n = diff[0::2].numel()
        grad_w, grad_l = 2.0 * diff[0::2] / n, 2.0 * diff[1::2] / n  # d mean(x^2) / dx = 2x / n
        num = grad_w.pow(2).sum()
        den = (grad_l * grad_w).sum()
        bound = (1.0 - mu) * num / (den + eps)
        scale = torch.where(den > 0, bound, torch.full_like(bound, max_scale))
        return scale.clamp(0.0, max_scale)


def margin_pair_weights(margins: torch.Tensor, mean_margin: float | None = None) -> torch.Tensor:
    """[P] reward margins (chosen - rejected, >= 0) -> [P] loss weights margin / mean margin, so pairs
    with a larger reward gap count more and the weights average 1 (the loss keeps its scale).
    mean_margin: the mean over every trained pair (all ranks); default: these margins' mean."""
    margins = margins.detach().double()
    mean = margins.mean().item() if mean_margin is None else float(mean_margin)
    if not (math.isfinite(mean) and mean > 0):
        return torch.ones_like(margins, dtype=torch.float32)
    return (margins / mean).float()
