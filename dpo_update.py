"""`dpo_update`: Diffusion-DPO on interleaved [c0, r0, c1, r1, ...] latents, one or more guarded
optimizer steps of a `policy.Policy`; both trainers use it (the online one through objectives.py).
`validate_dpo_levers`: the config rules of DPO's stabilising levers (margin weighting, RPO, norm
guard, winner preserving, the moving reference); `preset_levers_off`: a preset's levers are DPO's only.
"""

from __future__ import annotations

import itertools
import math

import torch

from distributed import all_max, all_sum
from policy import Policy
from prompt_data import dpo_noise_seed


def dpo_update(policy: Policy, x0: torch.Tensor, pair_prompts: list[str], n_pairs: int, prompt_cache, step: int,
               updates: int = 1, stream: int = 0, split: str = "all", pair_weights: torch.Tensor | None = None,
               timesteps: int = 1) -> dict:
    """Diffusion-DPO: `updates` optimizer steps on this rank's pairs: x0 [2P, S, 64] interleaved,
    n_pairs = P (0 allowed: x0 then holds 2 placeholder rows and this rank joins with zero weight).
    split "all": every update trains every pair; "disjoint": update u trains part u of the pairs
    (pairing.update_parts), each pair once. The loss is the mean over the update's pairs of every
    rank. Noise and sigma: one per pair, fresh per update, drawn from (seed, step, rank, stream,
    update), so a resumed run draws the same; timesteps T > 1: T draws per pair and update (the
    first as T = 1 draws it), gradients averaged over them in one optimizer step
    (the group objectives officially train 4-9 timesteps per sample, 4-7 on the 8-step text world;
    Diffusion-DPO trains one). pair_weights [P]: per-pair loss weights (margin
    weighting). The config's stabilising levers (chosen_sft_weight, norm_guard_weight /
    norm_guard_tolerance, winner_preserving / winner_preserving_mu) add to or scale the loss;
    read with getattr, so a config without them (0 / off) trains plain Diffusion-DPO."""
    import dpo_loss
    from dpo_loss import velocity_target
    from pairing import sample_pair_noise_and_sigmas, update_parts

    config, accelerator = policy.config, policy.accelerator
    world, rank = accelerator.num_processes, accelerator.process_index
    sft_weight = getattr(config, "chosen_sft_weight", 0.0)
    guard_weight, guard_tolerance = getattr(config, "norm_guard_weight", 0.0), getattr(config, "norm_guard_tolerance", 0.05)
    winner_preserving, winner_mu = getattr(config, "winner_preserving", False), getattr(config, "winner_preserving_mu", 0.0)
    if all_sum(accelerator, n_pairs)[0] == 0:
        return {"update/skipped_no_pairs": 1.0}
    # summed over pairs (weighted by the pair count of each micro-batch), then over ranks
    names = ["loss", "implicit_acc", "reward_margin", "err_chosen", "err_rejected", "ref_err_chosen",
             "ref_err_rejected", "velocity_norm_ratio", "chosen_sft_loss", "norm_guard_penalty", "winner_scale"]
    totals, trained_pairs, metrics = dict.fromkeys(names, 0.0), 0.0, {}
    for update, (part_lo, part_hi) in enumerate(update_parts(n_pairs, updates, split)):
        part_pairs = part_hi - part_lo
        part_total = all_sum(accelerator, part_pairs)[0]
        if part_total == 0:  # disjoint split with fewer pairs than updates, on every rank
            continue
        # every rank runs the same number of micro-batches (the most any rank needs)
        n_micro = int(all_max(accelerator, max(1, math.ceil(part_pairs / config.micro_batch_pairs))))
        generator = torch.Generator().manual_seed(dpo_noise_seed(config.seed, step, rank, stream, update))
        draws = []  # (noise, sigmas, target) per timestep; noise and target [2P, S, 64], sigmas [2P]
        for _ in range(timesteps):
            noise, sigmas = sample_pair_noise_and_sigmas(x0, generator, config.sigma_scheme or "logit_normal",
                                                         logit_mean=config.logit_mean, logit_std=config.logit_std)
            draws.append((noise, sigmas, velocity_target(x0, noise)))
        sums = dict.fromkeys(names, 0.0)
        total_loss_sum = 0.0
        for timestep, micro in itertools.product(range(timesteps), range(n_micro)):
            noise, sigmas, target = draws[timestep]
            lo = part_lo + micro * config.micro_batch_pairs
            hi, weight = min(lo + config.micro_batch_pairs, part_hi), 1.0
            if hi <= lo:  # padding micro-batch: same shapes, no contribution
                lo, hi, weight = 0, 1, 0.0
            rows = slice(2 * lo, 2 * hi)
            args = (x0[rows], noise[rows], sigmas[rows], *policy.conditioning(prompt_cache, pair_prompts[rows], x0.device))
            ref_pred = policy.reference_velocity(*args)
            with policy.no_sync(timestep == timesteps - 1 and micro == n_micro - 1):
                model_pred = policy.velocity(*args)
                scale = dpo_loss.winner_preserving_scale(model_pred, target[rows], winner_mu) if winner_preserving else 1.0
                weights = pair_weights[lo:hi] if pair_weights is not None and weight else None
                loss, m = dpo_loss.diffusion_dpo_loss(model_pred, ref_pred, target[rows], config.beta,
                                                      pair_weights=weights, rejected_scale=scale)
                total = loss
                if sft_weight:  # RPO: the chosen sample's flow-matching loss
                    sft = dpo_loss.chosen_sft_loss(model_pred, target[rows]).mean()
                    total = total + sft_weight * sft
                    m["chosen_sft_loss"] = sft.item()
                if guard_weight:
                    guard = dpo_loss.norm_guard_penalty(model_pred, ref_pred, guard_tolerance).mean()
                    total = total + guard_weight * guard
                    m["norm_guard_penalty"] = guard.item()
                # DDP / FSDP average gradients over ranks: scale to the global mean over pairs
                accelerator.backward(total * (weight * (hi - lo) * world / (part_total * timesteps)))
            m.update(loss=loss.item(), err_chosen=m["model_err_chosen"], err_rejected=m["model_err_rejected"],
                     winner_scale=float(scale))
            for name in names:
                sums[name] += weight * m.get(name, 0.0) * (hi - lo) / timesteps
            total_loss_sum += weight * total.item() * (hi - lo) / timesteps
        if policy.optimizer_step(math.isfinite(total_loss_sum), step, metrics):
            trained_pairs += part_total
            totals = {name: totals[name] + sums[name] for name in names}
    if trained_pairs:
        summed = dict(zip(names, all_sum(accelerator, *[totals[name] for name in names])))
        mean = {name: value / trained_pairs for name, value in summed.items()}
        metrics.update({"dpo/loss": mean["loss"], "dpo/implicit_acc": mean["implicit_acc"],
                        "dpo/implicit_reward_margin": mean["reward_margin"], "dpo/pair_updates": trained_pairs})
        for name in ("err_chosen", "err_rejected", "ref_err_chosen", "ref_err_rejected", "velocity_norm_ratio"):
            metrics[f"dpo/{name}"] = mean[name]
        # both above 0: the policy fits both samples worse than the reference (Diffusion-SDPO's pathology)
        metrics["dpo/chosen_err_above_ref"] = mean["err_chosen"] - mean["ref_err_chosen"]
        metrics["dpo/rejected_err_above_ref"] = mean["err_rejected"] - mean["ref_err_rejected"]
        if sft_weight:
            metrics["dpo/chosen_sft_loss"] = mean["chosen_sft_loss"]
        if guard_weight:
            metrics["dpo/norm_guard_penalty"] = mean["norm_guard_penalty"]
        if winner_preserving:
            metrics["dpo/winner_scale"] = mean["winner_scale"]
    return metrics


LEVER_FIELDS = ("pair_weighting", "chosen_sft_weight", "winner_preserving", "winner_preserving_mu",
                "ref_update_every", "ref_update_alpha", "norm_guard_weight", "norm_guard_tolerance")


def preset_levers_off(config, argv: list[str]):
    """A preset's DPO levers (text_world's moving reference) go back to their defaults for a group
    objective, as if the preset were DPO's alone; one given as a flag stays, and validate_dpo_levers
    refuses it."""
    import dataclasses

    from run_config import flag_value

    if getattr(config, "objective", "dpo") == "dpo":
        return
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    for field in LEVER_FIELDS:
        if field in defaults and flag_value(argv, field) is None:
            setattr(config, field, defaults[field])


def validate_dpo_levers(config):
    """DPO's stabilising levers (dpo_update, the moving reference; both trainers, before any model
    loads): each checked, naming its field. A field a trainer's Config lacks counts as off. The
    online trainer's group objectives ignore the levers: there a lever that is on is refused."""
    from run_config import require

    pair_weighting = getattr(config, "pair_weighting", "none")
    require(pair_weighting in ("none", "margin"), "pair_weighting", "must be 'none' or 'margin'")
    for field in ("chosen_sft_weight", "norm_guard_weight", "norm_guard_tolerance"):
        value = getattr(config, field, 0.0)
        require(math.isfinite(value) and value >= 0, field, "must be a finite number >= 0")
    mu = getattr(config, "winner_preserving_mu", 0.0)
    require(math.isfinite(mu) and 0 <= mu <= 1, "winner_preserving_mu", "must be in [0, 1]")
    every, alpha = getattr(config, "ref_update_every", 0), getattr(config, "ref_update_alpha", 1.0)
    require(every >= 0, "ref_update_every", "must be >= 0 (0: a frozen reference)")
    require(math.isfinite(alpha) and 0 < alpha <= 1, "ref_update_alpha", "must be in (0, 1]")
    require(every == 0 or config.train_mode == "lora", "ref_update_every",
            "needs train_mode 'lora' (the moving reference is a LoRA adapter)")
    objective = getattr(config, "objective", "dpo")
    lever_on = {"pair_weighting": pair_weighting != "none", "chosen_sft_weight": getattr(config, "chosen_sft_weight", 0) > 0,
                "winner_preserving": bool(getattr(config, "winner_preserving", False)), "ref_update_every": every > 0,
                "norm_guard_weight": getattr(config, "norm_guard_weight", 0) > 0}
    for field, on in lever_on.items():
        require(not on or objective == "dpo", field, f"applies to objective dpo only (objective is {objective!r})")
