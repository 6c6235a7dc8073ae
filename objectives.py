"""What the online trainer does with one step's rollouts, per `--objective`.

Every objective consumes the same `Rollouts` (K samples per prompt group, all on this rank) and
updates the `Policy` (policy.py):

- `dpo`   Diffusion-DPO: per group, chosen/rejected pairs by reward (pairing.py), the DPO loss
          against the frozen reference (dpo_loss.py). 2 of K samples per group with best_worst.
- `dgpo`  DGPO: every sample, weighted by its group advantage, in one DPO-style sigmoid per group.
- `nft`   DiffusionNFT: every sample regressed through an implicit positive / negative policy built
          from the trained and the old (EMA) policy, weighted by its advantage.
- `awm`   AWM: advantage-weighted flow matching with a PPO-style ratio to the old policy.
- `grpo`  Flow-GRPO: the rollout samples with an SDE and records its transitions; PPO-clipped ratio
          of each trained step's transition log-probability, KL to the reference (flow_grpo.py).

The group objectives share one update (`GroupObjective.update`): advantages within each group
(tied groups trained with A = 0 as the official scripts do, or dropped with drop_tied_groups; both
counted), noise and sigma per group or sample and update (each objective's official timestep
scheme by default), whole groups per micro-batch, the predictions the loss needs (reference, old,
and for AWM the rollout policy's), the loss from group_losses.py, backward scaled to the global
mean over the loss's units, one guarded optimizer step per update, and the old adapter's EMA step
(decay from the optimizer-step count, as the official schedules). Each subclass says what its loss is.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

import perf
from distributed import all_max, all_sum
from policy import dpo_update
from prompt_data import derived_seed


@dataclass
class Rollouts:
    """One step's rollouts on this rank, K consecutive rows per prompt group."""
    latents: torch.Tensor  # [N, S, 64] clean packed latents (what the sampler produced)
    rewards: torch.Tensor  # [N] float64
    group_ids: list[str]  # [N], equal within a prompt group; unique in the step over all ranks
    prompts: list[str]  # [N]
    trajectory: dict | None = None  # grpo: the SDE rollout's recorded transitions (qwen_image_rollout.SDERecorder.result)


@dataclass
class TrainedGroups:
    """This rank's share of one step's update: whole groups, in micro-batches of `per_micro` groups."""
    advantages: torch.Tensor  # [N] of every rollout row
    groups: list[list[int]]  # row indices of each trained group; a rank with none: one zero-weight placeholder
    n_groups: int  # real groups on this rank (0 with the placeholder)
    groups_total: int  # over all ranks
    rows_total: int  # over all ranks
    per_micro: int
    n_micro: int  # the same on every rank (the largest), so the collectives line up

    @property
    def order(self) -> list[int]:
        return [row for g in self.groups for row in g]

    def micro_batches(self):
        """-> (micro, rows: slice of `order`, n_rows, n_groups, weight, first group) per micro-batch;
        a rank with fewer groups runs padding micro-batches with weight 0 (same work, no contribution)."""
        bounds = [0]
        for g in self.groups:
            bounds.append(bounds[-1] + len(g))
        for micro in range(self.n_micro):
            first, last = micro * self.per_micro, min((micro + 1) * self.per_micro, self.n_groups)
            weight = 1.0
            if last <= first:
                first, last, weight = 0, 1, 0.0
            yield micro, slice(bounds[first], bounds[last]), bounds[last] - bounds[first], last - first, weight, first


def mean_metrics(accelerator, prefix: str, totals: dict, units_total: float, good_updates: int) -> dict:
    """Sums of unit-weighted metric values (this rank, every good update) -> their means over all ranks."""
    if not good_updates:
        return {}
    keys = sorted(totals)
    summed = all_sum(accelerator, *[totals[k] for k in keys])
    return {f"{prefix}/{k}": v / (units_total * good_updates) for k, v in zip(keys, summed)}


def parse_ema(spec: str) -> tuple[float, float, float]:
    """'start,rate,max' -> decay(step) = min(max, rate * (step - start)) from `start` on, 0 before."""
    start, rate, top = (float(x) for x in spec.split(","))
    return start, rate, top


def ema_decay(spec: str, step: int) -> float:
    start, rate, top = parse_ema(spec)
    return 0.0 if step < start else min(top, rate * (step - start))


class DPO:
    """Pairs per group (`pair_strategy`, ties dropped and counted), the Diffusion-DPO update."""

    name = "dpo"
    knobs = ("beta", "pair_strategy", "min_reward_margin")  # compared on resume (checkpoints.config_changes)
    uses_old_adapter = False

    def __init__(self, config):
        self.config = config

    def samples_with_old(self, optimizer_steps: int) -> bool:
        return False

    def update(self, policy, rollouts: Rollouts, prompt_cache, step: int) -> tuple[dict, torch.Tensor]:
        """-> (metrics, pairs [P, 2] of (chosen, rejected) row indices, for the sample grid)."""
        from pairing import interleave, pair_stats, select_pairs

        config, accelerator = self.config, policy.accelerator
        group_ids, rewards, latents, prompts = rollouts.group_ids, rollouts.rewards, rollouts.latents, rollouts.prompts
        pairs = select_pairs(group_ids, rewards, config.pair_strategy, config.min_reward_margin)  # [P, 2]
        stats = pair_stats(group_ids, rewards, pairs)
        if config.reverse_preference:
            pairs = pairs.flip(1)
        n_pairs = pairs.shape[0]
        device = accelerator.device
        if n_pairs:
            chosen_rejected_latents = interleave(pairs, latents).to(device)  # [2P, S, 64]
            pair_prompts = interleave(pairs, prompts)
        else:  # no pair on this rank: placeholder rows, zero weight, so it still joins every collective
            chosen_rejected_latents, pair_prompts = latents[:2].to(device), prompts[:2]
        metrics = dpo_update(policy, chosen_rejected_latents, pair_prompts, n_pairs, prompt_cache, step,
                             updates=config.updates_per_rollout)
        metrics["perf/update_tflop"] = perf.update_tflop(config, policy.transformer.config, prompt_cache, pair_prompts,
                                                         2 * config.micro_batch_pairs) if n_pairs else 0.0
        if "update/skipped_no_pairs" in metrics:
            accelerator.print(f"step {step}: no pairs (every group tied or below min_reward_margin); update skipped")
        pairs_total, tie_groups, no_pair_groups, gap_sum = all_sum(
            accelerator, n_pairs, stats["tie_groups"], stats["groups_without_pair"], stats["reward_gap_mean"] * n_pairs)
        metrics.update({"pairs/kept": pairs_total, "pairs/tie_groups_dropped": tie_groups,
                        "pairs/groups_without_pair": no_pair_groups, "pairs/reward_gap": gap_sum / max(pairs_total, 1)})
        return metrics, pairs


GROUP_SIGMA_SCHEMES = ("sampler", "sampler_stratified")  # besides pairing.SIGMA_SCHEMES


def stratified_sampler_indices(n_steps: int, strata: int, fraction: float, u: torch.Tensor) -> torch.Tensor:
    """AWM's `time_type = "discrete_wo_init"` (scripts/train_sd3_awm.py): the sampler's step indices
    1 .. int(n_steps * fraction) split into `strata` intervals (boundaries linspace(1, top, strata + 1)
    floored); u [strata] in [0, 1) picks one index in each -> long [strata]."""
    boundaries = torch.linspace(1, int(n_steps * fraction), strata + 1)
    lower, upper = boundaries[:-1].long(), boundaries[1:].long()
    return lower + (u * (upper - lower)).long()


class GroupObjective:
    """The update shared by the group-wise objectives; a subclass defines `loss` (and its knobs)."""

    name = ""
    knobs: tuple[str, ...] = ()  # the config fields of this objective, compared on resume
    units = "samples"  # what the loss averages over: "samples" or "groups"
    uses_old_adapter = True
    needs_reference = True
    ratio_to_rollout = False  # AWM: the loss needs the rollout policy's likelihood (precomputed per update)
    old_ema_per_optimizer_step = False  # DGPO: the old EMA steps after every optimizer step (NFT, AWM: per rollout)
    shared_noise = False  # one noise per group (DGPO's `use_shared_noise`) or per sample (NFT, AWM: randn_like)
    official_sigma_scheme = "logit_normal"  # what sigma_scheme "" means for this objective
    ema = "0,0,0"  # the old adapter's EMA schedule (parse_ema), of the optimizer-step count

    def __init__(self, config):
        self.config = config
        self.sigma_scheme = config.sigma_scheme or self.official_sigma_scheme

    def samples_with_old(self, optimizer_steps: int) -> bool:
        """Whether this step's rollouts are sampled with the old adapter."""
        return False

    def loss(self, model_pred, ref_pred, old_pred, target, sigmas, advantages, group_index, rollout_logp=None):
        raise NotImplementedError

    def advantages(self, rollouts: Rollouts, accelerator):
        from group_losses import group_advantages

        std = "group"
        if self.config.advantage_std == "global":
            # one scale: the std of every reward of the step (all ranks) + 1e-4, as the official
            # `sample.global_std = True` (flow_grpo/stat_tracking.py: np.std(rewards) + 1e-4)
            everything = accelerator.gather(rollouts.rewards.to(accelerator.device)) if accelerator.num_processes > 1 \
                else rollouts.rewards
            std = everything.double().std(unbiased=False).item() + 1e-4
        advantages, keep, group_index, stats = group_advantages(rollouts.rewards, rollouts.group_ids, std=std,
                                                                group_size=self.config.samples_per_prompt)
        if self.config.reverse_preference:  # control run: train towards the worse samples
            advantages = -advantages
        return advantages, keep, group_index, stats

    def trained_groups(self, rollouts: Rollouts, accelerator, step: int) -> tuple[TrainedGroups | None, dict]:
        """-> (the groups to train, None when no rank has one; the adv/* metrics). Tied groups (A = 0)
        are trained too, as the official scripts do, unless drop_tied_groups."""
        advantages, keep, group_index, stats = self.advantages(rollouts, accelerator)
        trained = keep if self.config.drop_tied_groups else torch.ones_like(keep)
        by_group: dict[int, list[int]] = {}
        for row in torch.nonzero(trained).flatten().tolist():
            by_group.setdefault(int(group_index[row]), []).append(row)
        metrics = self._advantage_metrics(accelerator, stats, advantages[trained], self.config.drop_tied_groups)
        groups = list(by_group.values())
        groups_total, rows_total = all_sum(accelerator, len(groups), sum(len(g) for g in groups))
        if rows_total == 0:
            accelerator.print(f"step {step}: every group has equal rewards (drop_tied_groups); update skipped")
            metrics["update/skipped_no_groups"] = 1.0
            return None, metrics
        per_micro = self.config.micro_batch_groups
        n_micro = int(all_max(accelerator, max(1, math.ceil(len(groups) / per_micro))))
        placeholder = [list(range(self.config.samples_per_prompt))]  # joins the collectives with zero weight
        return TrainedGroups(advantages, groups or placeholder, len(groups), int(groups_total), int(rows_total),
                             per_micro, n_micro), metrics

    def _draws(self, policy, rollouts, groups_list, step, shape, n_updates):
        """-> [(noise [M, *shape], sigmas [M]) per update] for the rows of `groups_list` in order.
        Everything a group draws comes from generators seeded by (seed, step, [update,] its id), so
        the same on any number of ranks. Noise: one per group (shared_noise) or per row. Sigmas per
        `sigma_scheme`: logit_normal / uniform / mode: one per group and update (pairing.sample_sigmas);
        "sampler": per row, the sampler's own sigmas (qwen_image_rollout.sampler_sigmas) in a random order
        per row, update u taking the u-th (official NFT: `timesteps` of the sampler, permuted per
        sample, scripts/train_nft_sd3.py); "sampler_stratified": per group, one sampler step index
        per stratum (stratified_sampler_indices, strata = updates_per_rollout, visited in a random
        order; official AWM `time_type = "discrete_wo_init"`, `train.timestep_fraction` 0.9)."""
        from pairing import sample_sigmas

        config = self.config
        scheme = self.sigma_scheme
        schedule = policy.sampler_sigmas() if scheme in GROUP_SIGMA_SCHEMES else None  # [n_steps]
        keys = [zlib.crc32(rollouts.group_ids[g[0]].encode()) for g in groups_list]
        per_rollout = [torch.Generator().manual_seed(derived_seed("group_timesteps", config.seed, step, key))
                       for key in keys]
        if scheme == "sampler":
            orders = [[torch.randperm(len(schedule), generator=gen) for _ in g] for gen, g in zip(per_rollout, groups_list)]
        elif scheme == "sampler_stratified":
            orders = [torch.randperm(n_updates, generator=gen) for gen in per_rollout]
        draws = []
        for update in range(n_updates):
            noises, sigmas = [], []
            for number, (key, g) in enumerate(zip(keys, groups_list)):
                gen = torch.Generator().manual_seed(derived_seed("group_noise", config.seed, step, update, key))
                if self.shared_noise:
                    noises.append(torch.randn(tuple(shape), generator=gen).expand(len(g), *shape))
                else:
                    noises.append(torch.randn((len(g), *shape), generator=gen))
                if scheme == "sampler":
                    sigmas.append(torch.stack([schedule[order[update % len(schedule)]] for order in orders[number]]))
                elif scheme == "sampler_stratified":
                    index = stratified_sampler_indices(len(schedule), n_updates, 0.9, torch.rand(n_updates, generator=gen))
                    sigmas.append(schedule[index[orders[number][update]]].expand(len(g)))
                else:
                    sigma = sample_sigmas(1, scheme, gen, logit_mean=config.logit_mean, logit_std=config.logit_std)
                    sigmas.append(sigma.float().expand(len(g)))
            draws.append((torch.cat(noises), torch.cat(sigmas).float()))
        return draws

    def update(self, policy, rollouts: Rollouts, prompt_cache, step: int) -> tuple[dict, torch.Tensor]:
        """`updates_per_rollout` optimizer steps on this rank's groups; the loss is the mean over
        every unit (sample or group) of every rank. -> (metrics, best/worst pairs for the grid)."""
        from dpo_loss import velocity_target
        from pairing import select_pairs

        config, accelerator = self.config, policy.accelerator
        world, device = accelerator.num_processes, accelerator.device
        batch, metrics = self.trained_groups(rollouts, accelerator, step)
        grid_pairs = select_pairs(rollouts.group_ids, rollouts.rewards, "best_worst")
        if batch is None:
            return metrics, grid_pairs
        groups_list, order = batch.groups, batch.order
        units_total = batch.groups_total if self.units == "groups" else batch.rows_total
        x0 = rollouts.latents[order].to(device)  # [M, S, 64], whole groups in a row
        prompts = [rollouts.prompts[i] for i in order]
        adv = batch.advantages[order].to(device)
        dense_group = torch.tensor([number for number, g in enumerate(groups_list) for _ in g])  # [M]
        n_micro = batch.n_micro

        def micro_batches():  # -> (micro, rows, units, weight, first group)
            for micro, rows, n_rows, n_groups, weight, first in batch.micro_batches():
                yield micro, rows, (n_groups if self.units == "groups" else n_rows), weight, first

        draws = [(noise.to(device, x0.dtype), sigmas.to(device))
                 for noise, sigmas in self._draws(policy, rollouts, groups_list, step, x0.shape[1:],
                                                  config.updates_per_rollout)]
        rollout_logp = self._rollout_likelihoods(policy, prompt_cache, x0, prompts, draws, micro_batches, device)
        totals, good_updates, decay = {}, 0, None
        for update in range(config.updates_per_rollout):
            noise, sigmas = draws[update]
            target = velocity_target(x0, noise)
            sums = {}
            for micro, rows, units, weight, first in micro_batches():
                args = (x0[rows], noise[rows], sigmas[rows], *policy.conditioning(prompt_cache, prompts[rows], device))
                ref_pred = policy.reference_velocity(*args) if self.needs_reference else None
                old_pred = policy.old_velocity(*args) if self.uses_old_adapter else None
                with policy.no_sync(micro == n_micro - 1):
                    model_pred = policy.velocity(*args)
                    loss, m = self.loss(model_pred, ref_pred, old_pred, target[rows], sigmas[rows], adv[rows],
                                        dense_group[rows] - first,
                                        rollout_logp=rollout_logp[update][rows] if update > 0 and self.ratio_to_rollout else None)
                    # DDP / FSDP average gradients over ranks: scale to the global mean over units
                    accelerator.backward(loss * (weight * units * world / units_total))
                for key, value in m.items():
                    sums[key] = sums.get(key, 0.0) + weight * value * units
            if policy.optimizer_step(math.isfinite(sums["loss"]), step, metrics):
                good_updates += 1
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0.0) + value
                if self.uses_old_adapter and self.old_ema_per_optimizer_step:
                    # official DGPO: ema_ref.step after each optimizer step, decay min(0.3, 0.001 * global_step)
                    # with global_step = the optimizer steps before this one
                    decay = ema_decay(self.ema, policy.optimizer_steps - 1)
                    policy.update_old(decay)
        metrics["perf/update_tflop"] = perf.update_tflop(
            config, policy.transformer.config, prompt_cache, prompts, config.samples_per_prompt * batch.per_micro,
            reference=self.needs_reference, old=self.uses_old_adapter,
            extra_policy_forwards=config.updates_per_rollout - 1 if self.ratio_to_rollout else 0) if batch.n_groups else 0.0
        if self.uses_old_adapter and not self.old_ema_per_optimizer_step:
            # official NFT / AWM: once per rollout batch, after its optimizer steps, with the decay of
            # the optimizer-step count (`global_step` in scripts/train_nft_sd3.py, train_sd3_awm.py)
            decay = ema_decay(self.ema, policy.optimizer_steps)
            policy.update_old(decay)
        if decay is not None:
            metrics["old/ema_decay"] = decay
        metrics["update/optimizer_steps"] = float(policy.optimizer_steps)
        metrics.update(mean_metrics(accelerator, self.name, totals, units_total, good_updates))
        return metrics, grid_pairs

    def _rollout_likelihoods(self, policy, prompt_cache, x0, prompts, draws, micro_batches, device):
        """AWM (ratio_to_rollout): [updates][M] the likelihood of every update's (noise, sigma) under
        the weights that sampled the rollouts, computed before the first optimizer step (as the
        official on-policy recipe computes its `old_log_probs`); the first update needs none (its
        own prediction, detached). Every rank runs the same forwards (padding included)."""
        if not self.ratio_to_rollout or len(draws) < 2:
            return None
        from dpo_loss import velocity_target

        out = [None]
        for noise, sigmas in draws[1:]:
            target = velocity_target(x0, noise)
            logp = torch.zeros(x0.shape[0], device=device)
            for _, rows, _, _, _ in micro_batches():
                args = (x0[rows], noise[rows], sigmas[rows], *policy.conditioning(prompt_cache, prompts[rows], device))
                with torch.no_grad():
                    logp[rows] = self.likelihood(policy.velocity(*args), target[rows], sigmas[rows])
            out.append(logp)
        return out

    @staticmethod
    def _advantage_metrics(accelerator, stats, trained_advantages, dropped: bool) -> dict:
        """Over every rank: groups, tied groups (all rewards equal) and how many of them were trained,
        samples trained, mean |A|, max and min A of the trained samples."""
        groups, tied, kept, abs_sum = all_sum(
            accelerator, stats["groups"], stats["zero_variance_groups"], float(trained_advantages.numel()),
            float(trained_advantages.abs().sum()))
        has = trained_advantages.numel() > 0
        top = all_max(accelerator, trained_advantages.max().item() if has else -math.inf)
        bottom = -all_max(accelerator, -trained_advantages.min().item() if has else -math.inf)
        return {"adv/groups": groups, "adv/tied_groups": tied, "adv/tied_groups_trained": 0.0 if dropped else tied,
                "adv/zero_variance_groups_dropped": tied if dropped else 0.0, "adv/samples_kept": kept,
                "adv/abs_mean": abs_sum / max(kept, 1), "adv/max": top if kept else 0.0,
                "adv/min": bottom if kept else 0.0}


COMMON_GROUP_KNOBS = ("advantage_std", "drop_tied_groups", "sigma_scheme")


class DGPO(GroupObjective):
    """group_losses.dgpo_loss: (1/beta) * -logsigmoid((1/K) sum_i A_i * -beta (err_model_i - err_ref_i))
    per group (the official gradient). Knobs: dgpo_beta, dgpo_kl_weight, dgpo_exact_gradient,
    dgpo_clip_range (> 0 adds the old adapter, an EMA with schedule dgpo_old_ema stepped after every
    optimizer step, the official PPO-style clip on each sample's error, and rollouts sampled with
    that EMA once more than dgpo_switch_ema_ref optimizer steps are done)."""

    name, units = "dgpo", "groups"
    knobs = COMMON_GROUP_KNOBS + ("dgpo_beta", "dgpo_kl_weight", "dgpo_exact_gradient", "dgpo_clip_range",
                                  "dgpo_old_ema", "dgpo_switch_ema_ref")
    old_ema_per_optimizer_step = True
    shared_noise = True  # official config/dgpo.py `use_shared_noise = True`

    def __init__(self, config):
        super().__init__(config)
        self.uses_old_adapter = config.dgpo_clip_range > 0
        self.ema = config.dgpo_old_ema

    def samples_with_old(self, optimizer_steps: int) -> bool:
        # official scripts/train_sd3_dgpo.py: `if global_step > config.switch_ema_ref: ema_ref.copy_ema_to(...)`
        # before sampling (the EMA reference is the clip's old policy)
        return self.uses_old_adapter and optimizer_steps > self.config.dgpo_switch_ema_ref

    def loss(self, model_pred, ref_pred, old_pred, target, sigmas, advantages, group_index, rollout_logp=None):
        from group_losses import dgpo_loss

        c = self.config
        return dgpo_loss(model_pred, ref_pred, target, advantages, group_index, c.dgpo_beta, c.dgpo_kl_weight,
                         old_pred=old_pred, clip_range=c.dgpo_clip_range, exact_gradient=c.dgpo_exact_gradient)


class NFT(GroupObjective):
    """group_losses.nft_loss: v+ = b v + (1-b) v_old, v- = (1+b) v_old - b v, each sample's
    x0-prediction errors of v+ / v- weighted by r and 1 - r. Rollouts come from the old adapter
    (the paper's behaviour policy). Knobs: nft_beta, nft_adv_clip, nft_kl_weight, nft_old_ema."""

    name = "nft"
    knobs = COMMON_GROUP_KNOBS + ("nft_beta", "nft_adv_clip", "nft_kl_weight", "nft_old_ema")
    official_sigma_scheme = "sampler"  # official: trains on the sampler's own timesteps

    def __init__(self, config):
        super().__init__(config)
        self.needs_reference = config.nft_kl_weight > 0
        self.ema = config.nft_old_ema

    def samples_with_old(self, optimizer_steps: int) -> bool:
        return True  # official scripts/train_nft_sd3.py: set_adapter("old") around sampling

    def loss(self, model_pred, ref_pred, old_pred, target, sigmas, advantages, group_index, rollout_logp=None):
        from group_losses import nft_loss

        c = self.config
        return nft_loss(model_pred, old_pred, target, sigmas, advantages, c.nft_beta, c.nft_adv_clip,
                        ref_pred=ref_pred, kl_weight=c.nft_kl_weight)


class AWM(GroupObjective):
    """group_losses.awm_loss: PPO-clipped ratio of flow-matching likelihoods to the policy that
    sampled the rollouts (on-policy, as the official OCR recipe), weighted by the advantage, plus KL
    to the reference and to the old (EMA) adapter. Knobs: awm_clip_range, awm_adv_clip,
    awm_weighting, awm_kl_weight, awm_old_kl_weight, awm_old_ema."""

    name = "awm"
    knobs = COMMON_GROUP_KNOBS + ("awm_clip_range", "awm_adv_clip", "awm_weighting", "awm_kl_weight",
                                  "awm_old_kl_weight", "awm_old_ema")
    ratio_to_rollout = True
    official_sigma_scheme = "sampler_stratified"  # official OCR `time_type = "discrete_wo_init"`

    def __init__(self, config):
        super().__init__(config)
        self.needs_reference = config.awm_kl_weight > 0
        self.ema = config.awm_old_ema

    def likelihood(self, pred, target, sigmas):
        from group_losses import awm_log_likelihood

        return awm_log_likelihood(pred, target, sigmas, self.config.awm_weighting)

    def loss(self, model_pred, ref_pred, old_pred, target, sigmas, advantages, group_index, rollout_logp=None):
        from group_losses import awm_loss

        c = self.config
        if rollout_logp is None:  # the batch's first update: the rollout policy is the current one
            rollout_logp = self.likelihood(model_pred.detach(), target, sigmas)
        return awm_loss(model_pred, old_pred, target, sigmas, advantages, clip_range=c.awm_clip_range,
                        adv_clip=c.awm_adv_clip, weighting=c.awm_weighting, ref_pred=ref_pred,
                        kl_weight=c.awm_kl_weight, old_kl_weight=c.awm_old_kl_weight, rollout_logp=rollout_logp)


class GRPO(GroupObjective):
    """Flow-GRPO (flow_grpo.py): the rollout samples with the SDE (qwen_image_rollout.SDERecorder, started by
    the trainer through `recorder()`) and records each trained step's transition x_j -> x_{j+1} and
    its log-probability; the update recomputes that log-probability under the current policy at every
    trained step of every kept sample and applies the PPO-clipped ratio to the clipped group
    advantage, plus the KL to the reference (LoRA disabled) on the step means. Per update (inner
    epoch): gradients accumulate over all micro-batches and all trained steps, then one guarded
    optimizer step (official train_sd3.py accumulates over the trained timesteps); the loss is the mean
    over every (sample, trained step) of every rank. No old adapter: the old log-probs are the
    rollout's. Knobs: advantage_std, grpo_noise_level, grpo_sde_window, grpo_timestep_fraction,
    grpo_clip_range, grpo_adv_clip, grpo_kl_weight."""

    name = "grpo"
    knobs = ("advantage_std", "grpo_noise_level", "grpo_sde_window", "grpo_timestep_fraction", "grpo_clip_range",
             "grpo_adv_clip", "grpo_kl_weight")
    uses_old_adapter = False

    def __init__(self, config):
        super().__init__(config)
        self.needs_reference = config.grpo_kl_weight > 0

    def recorder(self):
        """A fresh SDE recorder for one step's rollout (qir.rollout(..., scheduler_step=recorder.chunk_step))."""
        import flow_grpo
        import qwen_image_rollout as qir

        c = self.config
        sde, trained = flow_grpo.sde_steps(c.num_inference_steps, c.grpo_sde_window, c.grpo_timestep_fraction)
        return qir.SDERecorder(c.grpo_noise_level, sde, trained)

    def transition(self, policy, trajectory, rows, j: int, conditioning, reference: bool = False):
        """Under the policy (or the reference): (log p(x_{j+1} | x_j) [n], step mean [n, S, 64], sigma_t
        [n, 1, 1]) of the recorded transitions `rows` at trained step j."""
        import flow_grpo

        device = policy.accelerator.device
        x = trajectory["before"][rows, j].to(device)
        sigma, sigma_next = trajectory["sigmas"][j], trajectory["sigmas_next"][j]
        predict = policy.reference_velocity_at if reference else policy.velocity_at
        v = predict(x, sigma.expand(x.shape[0]).to(device), *conditioning)
        mean, step_std, sigma_t = flow_grpo.sde_step_mean(x, v, sigma, sigma_next, trajectory["sigma_max"],
                                                          trajectory["noise_level"])
        log_prob = flow_grpo.transition_log_prob(trajectory["after"][rows, j].to(device), mean, step_std)
        return log_prob, mean, sigma_t

    def update(self, policy, rollouts: Rollouts, prompt_cache, step: int) -> tuple[dict, torch.Tensor]:
        """`updates_per_rollout` optimizer steps, each over every kept sample and trained step of this rank.
        -> (metrics, best/worst pairs for the grid)."""
        from flow_grpo import grpo_loss
        from pairing import select_pairs

        config, accelerator = self.config, policy.accelerator
        world, device = accelerator.num_processes, accelerator.device
        trajectory = rollouts.trajectory
        if trajectory is None:
            raise ValueError("objective grpo needs the SDE rollout's trajectory (Rollouts.trajectory)")
        batch, metrics = self.trained_groups(rollouts, accelerator, step)  # tied groups carry the KL term
        grid_pairs = select_pairs(rollouts.group_ids, rollouts.rewards, "best_worst")
        if batch is None:
            return metrics, grid_pairs
        order = torch.tensor(batch.order)
        traj = {**trajectory, "before": trajectory["before"][order], "after": trajectory["after"][order]}
        old_log_probs = trajectory["log_probs"][order]  # [M, T]
        prompts = [rollouts.prompts[i] for i in order.tolist()]
        adv = batch.advantages[order].to(device)
        n_steps = old_log_probs.shape[1]
        units_total = batch.rows_total * n_steps  # the loss is the mean over every (sample, trained step)
        n_micro = batch.n_micro
        c = config
        totals, good_updates = {}, 0
        for update in range(config.updates_per_rollout):
            sums = {}
            for micro, rows, n, _, weight, _ in batch.micro_batches():
                conditioning = policy.conditioning(prompt_cache, prompts[rows], device)
                for j in range(n_steps):
                    ref_mean = None
                    if self.needs_reference:
                        _, ref_mean, _ = self.transition(policy, traj, rows, j, conditioning, reference=True)
                    with policy.no_sync(micro == n_micro - 1 and j == n_steps - 1):
                        log_prob, mean, sigma_t = self.transition(policy, traj, rows, j, conditioning)
                        loss, m = grpo_loss(log_prob, old_log_probs[rows, j].to(device), adv[rows], c.grpo_clip_range,
                                            c.grpo_adv_clip, mean, ref_mean, sigma_t, c.grpo_kl_weight)
                        # DDP / FSDP average gradients over ranks: scale to the global mean over (sample, step)
                        accelerator.backward(loss * (weight * n * world / units_total))
                    for key, value in m.items():
                        sums[key] = sums.get(key, 0.0) + weight * value * n
            if policy.optimizer_step(math.isfinite(sums["loss"]), step, metrics):
                good_updates += 1
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0.0) + value
        # one policy forward + backward (+ the reference forward when the KL is on) per trained step per row
        metrics["perf/update_tflop"] = perf.update_tflop(
            config, policy.transformer.config, prompt_cache, prompts, config.samples_per_prompt * batch.per_micro,
            reference=self.needs_reference, old=False, forwards_per_row=n_steps) if batch.n_groups else 0.0
        metrics["grpo/trained_steps"] = float(n_steps)
        metrics.update(mean_metrics(accelerator, "grpo", totals, units_total, good_updates))
        return metrics, grid_pairs


OBJECTIVES = {"dpo": DPO, "dgpo": DGPO, "nft": NFT, "awm": AWM, "grpo": GRPO}


def build(config):
    return OBJECTIVES[config.objective](config)
