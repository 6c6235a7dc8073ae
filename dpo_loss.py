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
                       beta: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The Diffusion-DPO loss on an interleaved [c0, r0, c1, r1, ...] batch of shape [2P, ...].

    model_pred carries the gradient; ref_pred (the frozen reference) should be computed under
    no_grad and target is `velocity_target(latents, noise)`. Any float dtype; math in fp32.
    Returns (loss: fp32 scalar, metrics: detached python floats).
    """
    _check(model_pred, ref_pred, target, beta)
    model_err = per_sample_mse(model_pred, target)  # [2P]
    ref_err = per_sample_mse(ref_pred.detach(), target)  # [2P]
    model_w, model_l = model_err[0::2], model_err[1::2]  # [P] each
    ref_w, ref_l = ref_err[0::2], ref_err[1::2]

    chosen_reward = -0.5 * beta * (model_w - ref_w)  # implicit rewards, [P]
    rejected_reward = -0.5 * beta * (model_l - ref_l)
    inside = chosen_reward - rejected_reward
    loss = -F.logsigmoid(inside).mean()

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
        }
    return loss, metrics


def flow_matching_sft_loss(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Plain flow-matching loss (what DPO is benchmarked against): mean of per-sample errors."""
    return per_sample_mse(model_pred, target).mean()
