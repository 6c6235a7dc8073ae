"""Flow-GRPO (Liu et al., arXiv 2505.05470): the SDE sampling step of a flow-matching model, the
Gaussian log-probability of one transition, and the clipped policy-gradient loss with its KL term.
Torch only; imports nothing from this project (copy it alone).

Conventions: flow-matching time sigma in [0, 1] (x_sigma = (1 - sigma) x0 + sigma e), sampling runs
from sigma = 1 to 0 over the scheduler's sigmas s_0 > s_1 > ... > s_n = 0, dt = s_{i+1} - s_i < 0.
Latents are any [B, ...] tensor; every formula is per element, log-probs are means over all
non-batch dims (as the official code reduces them).

The SDE step (official flow_grpo/diffusers_patch/sd3_sde_with_logprob.py, `sde_step_with_logprob`,
sde_type "sde"): with noise level a,

    sigma_t = a * sqrt(t / (1 - t))            t = 1 (the first step) uses 1 - s_1 in the denominator
    mean    = x + [v + sigma_t^2 / (2 t) * (x + (1 - t) v)] * dt
    x_next  = mean + sigma_t * sqrt(-dt) * eps,    eps ~ N(0, I)
    log p(x_next | x) = mean over elements of
                        -(x_next - mean)^2 / (2 (sigma_t sqrt(-dt))^2) - log(sigma_t sqrt(-dt)) - log sqrt(2 pi)

a = 0 is the Euler step x + v dt of the ODE (the deterministic sampler).
"""

from __future__ import annotations

import math

import torch

# official config/base.py: sample.noise_level 0.7, train.clip_range 1e-4, train.adv_clip_max 5;
# config/grpo.py general_ocr_sd3: train.beta 0.04, train.timestep_fraction 0.99
DEFAULT_NOISE_LEVEL = 0.7
DEFAULT_CLIP_RANGE = 1e-4
DEFAULT_ADV_CLIP = 5.0
DEFAULT_KL_WEIGHT = 0.04
DEFAULT_TIMESTEP_FRACTION = 0.99


def _column(value, like: torch.Tensor) -> torch.Tensor:
    """A scalar or [B] tensor -> fp32 [B, 1, ..., 1] broadcastable against `like`."""
    value = torch.as_tensor(value, dtype=torch.float32, device=like.device)
    if value.dim() == 0:
        value = value.expand(like.shape[0])
    return value.reshape(-1, *([1] * (like.dim() - 1)))


def sde_sigma(sigma, sigma_max: float, noise_level: float) -> torch.Tensor:
    """sigma_t = a sqrt(t / (1 - t)); at t = 1 (the first step, where it is infinite) the official code
    divides by 1 - sigma_max instead, sigma_max = the scheduler's second sigma s_1 (`sigma_max =
    self.sigmas[1]`, `torch.where(sigma == 1, sigma_max, sigma)`)."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    denominator = 1 - torch.where(sigma == 1, torch.full_like(sigma, float(sigma_max)), sigma)
    return torch.sqrt(sigma / denominator) * noise_level


def sde_step_mean(latents: torch.Tensor, velocity: torch.Tensor, sigma, sigma_next, sigma_max: float,
                  noise_level: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (mean of x_next [B, ...], its std sigma_t sqrt(-dt) [B, 1, ...], sigma_t [B, 1, ...]), fp32.
    sigma, sigma_next: scalars or [B]. All in fp32 (bf16 overflows here, as the official code notes)."""
    x, v = latents.float(), velocity.float()
    t, t_next = _column(sigma, x), _column(sigma_next, x)
    dt = t_next - t
    std_t = _column(sde_sigma(t.flatten().cpu(), sigma_max, noise_level), x)
    mean = x + (v + std_t ** 2 / (2 * t) * (x + (1 - t) * v)) * dt
    return mean, std_t * torch.sqrt(-dt), std_t


def transition_log_prob(next_latents: torch.Tensor, mean: torch.Tensor, step_std: torch.Tensor) -> torch.Tensor:
    """[B]: the Gaussian log-density of next_latents under N(mean, step_std^2), averaged over every
    non-batch element (official `log_prob.mean(dim=tuple(range(1, ndim)))`). fp32."""
    x = next_latents.detach().float()
    std = step_std.float()
    log_prob = -((x - mean) ** 2) / (2 * std ** 2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return log_prob.reshape(log_prob.shape[0], -1).mean(dim=1)


def window_start(num_steps: int, length: int, seed: int) -> int:
    """Flow-GRPO-Fast's random SDE window start: uniform over 0 .. num_steps // 2 - length (official
    flow_grpo/diffusers_patch/sd3_pipeline_with_logprob_fast.py: `random.randint(sde_window_range[0],
    sde_window_range[1] - sde_window_size)` with config/grpo.py `sde_window_range = (0, num_steps // 2)`,
    drawn per pipeline call from Python's `random`); here from a generator seeded with `seed`."""
    top = num_steps // 2 - length
    if length < 1 or top < 0:
        raise ValueError(f"window random:{length}: need 1 <= length <= num_steps // 2 = {num_steps // 2}")
    return int(torch.randint(0, top + 1, (1,), generator=torch.Generator().manual_seed(seed)))


def resolve_window(window: str, num_steps: int, seed: int) -> str:
    """"random:LENGTH" -> "start,LENGTH" with start = window_start(num_steps, LENGTH, seed); any other
    window as it is (checked by sde_steps)."""
    if not window.strip().startswith("random:"):
        return window
    try:
        length = int(window.split(":", 1)[1])
    except ValueError:
        raise ValueError(f"window must be '', 'start,length' or 'random:length', got {window!r}") from None
    return f"{window_start(num_steps, length, seed)},{length}"


def sde_steps(num_steps: int, window: str = "", timestep_fraction: float = DEFAULT_TIMESTEP_FRACTION,
              ) -> tuple[list[int], list[int]]:
    """-> (SDE step indices, trained step indices) of a num_steps sampler.

    window "": every step is an SDE step (official train_sd3.py); "start,length": steps start ..
    start+length-1 are SDE steps, the others ODE (Euler) steps (Flow-GRPO-Fast / MixGRPO: official
    train_sd3_fast.py, `sample.sde_window_size`; its random start: resolve_window). Trained: the first
    int(n_sde * timestep_fraction) SDE steps (official `num_train_timesteps = int(num_steps *
    timestep_fraction)`: 0.99 drops the last, sharpest step; use 1 to train a whole window, as
    train_sd3_fast.py does). Raises ValueError on a window outside the steps or no trained step."""
    if window.strip():
        try:
            start, length = (int(x) for x in window.split(","))
        except ValueError:
            raise ValueError(f"window must be '' or 'start,length' (two integers), got {window!r}") from None
        if start < 0 or length < 1 or start + length > num_steps:
            raise ValueError(f"window {window!r}: need start >= 0, length >= 1, start + length <= {num_steps} steps")
        sde = list(range(start, start + length))
    else:
        sde = list(range(num_steps))
    if not (0 < timestep_fraction <= 1):
        raise ValueError(f"timestep_fraction must be in (0, 1], got {timestep_fraction!r}")
    n_train = int(len(sde) * timestep_fraction)
    if n_train < 1:
        raise ValueError(f"{len(sde)} SDE step(s) x timestep_fraction {timestep_fraction} trains no step")
    return sde, sde[:n_train]


def grpo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
              clip_range: float = DEFAULT_CLIP_RANGE, adv_clip: float = DEFAULT_ADV_CLIP,
              mean: torch.Tensor | None = None, ref_mean: torch.Tensor | None = None,
              sigma_t: torch.Tensor | None = None, kl_weight: float = 0.0) -> tuple[torch.Tensor, dict]:
    """The Flow-GRPO loss of one transition per row (official scripts/train_sd3.py):

        A      = clip(advantage, -adv_clip, adv_clip)
        ratio  = exp(log_prob - old_log_prob)                 old: the rollout's log-prob
        policy = mean over rows of max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))
        kl     = mean over rows of mean((mean - ref_mean)^2) / (2 sigma_t^2)
        loss   = policy + kl_weight * kl

    The KL is the official one: the squared distance of the two Gaussians' means over 2 sigma_t^2,
    sigma_t WITHOUT the sqrt(-dt) factor (`/ (2 * std_dev_t ** 2)`): the exact per-element KL of the
    two transitions, (mean - ref_mean)^2 / (2 sigma_t^2 (-dt)), times -dt. Rows: [B] everywhere.
    Metrics: loss (policy part), kl, ratio_mean, clip_frac (|ratio - 1| > eps), approx_kl
    (0.5 mean (log_prob - old)^2, the official `approx_kl`), log_prob_mean."""
    if not (math.isfinite(clip_range) and clip_range > 0):
        raise ValueError(f"clip_range must be a finite number > 0, got {clip_range!r}")
    if not (math.isfinite(adv_clip) and adv_clip > 0):
        raise ValueError(f"adv_clip must be a finite number > 0, got {adv_clip!r}")
    if log_prob.shape != old_log_prob.shape or advantages.shape != log_prob.shape or log_prob.dim() != 1:
        raise ValueError(f"log_prob {tuple(log_prob.shape)}, old_log_prob {tuple(old_log_prob.shape)} and "
                         f"advantages {tuple(advantages.shape)} must all be [B]")
    if kl_weight > 0 and (mean is None or ref_mean is None or sigma_t is None):
        raise ValueError("kl_weight > 0 needs mean, ref_mean and sigma_t")
    a = advantages.to(log_prob.device).float().clamp(-adv_clip, adv_clip)
    ratio = torch.exp(log_prob.float() - old_log_prob.to(log_prob.device).float())
    policy = torch.maximum(-a * ratio, -a * ratio.clamp(1 - clip_range, 1 + clip_range)).mean()
    if mean is not None and ref_mean is not None and sigma_t is not None:
        distance = (mean.float() - ref_mean.detach().float()).pow(2)
        kl = (distance.reshape(distance.shape[0], -1).mean(dim=1) / (2 * sigma_t.float().reshape(-1) ** 2)).mean()
    else:
        kl = torch.zeros((), device=log_prob.device)
    total = policy + kl_weight * kl if kl_weight > 0 else policy
    with torch.no_grad():
        delta = log_prob.float() - old_log_prob.to(log_prob.device).float()
        metrics = {"loss": policy.item(), "kl": kl.item(), "ratio_mean": ratio.mean().item(),
                   "clip_frac": ((ratio - 1).abs() > clip_range).float().mean().item(),
                   "approx_kl": (0.5 * delta.pow(2)).mean().item(), "log_prob_mean": log_prob.float().mean().item()}
    return total, metrics
