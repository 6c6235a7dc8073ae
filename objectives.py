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
          of each trained step's transition log-probability, KL to the reference (objective_grpo.py).

The group objectives share one update (`GroupObjective.update`): advantages within each group
(tied groups trained with A = 0 as the official scripts, or dropped: drop_tied_groups), the groups
cut into one part per optimizer step (update_split; objective_grpo.split_parts), per part its
noise and `timesteps` sigmas per group or sample (each objective's official scheme by default),
whole groups per micro-batch, the predictions the loss needs, the loss from group_losses.py,
backward scaled to the global mean, one guarded optimizer step, and the old adapter's EMA step.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

import objective_grpo
import perf
from distributed import all_max, all_sum
from dpo_update import dpo_update
from group_losses import first_steps_available, stratified_sampler_indices
from objective_grpo import TrainedGroups, mean_metrics
from prompt_data import derived_seed


@dataclass
class Rollouts:
    """One step's rollouts on this rank, K consecutive rows per prompt group."""
    latents: torch.Tensor  # [N, S, 64] clean packed latents (what the sampler produced)
    rewards: torch.Tensor  # [N] float64
    group_ids: list[str]  # [N], equal within a prompt group; unique in the step over all ranks
    prompts: list[str]  # [N]
    trajectory: dict | None = None  # grpo: the SDE rollout's recorded transitions (qwen_image_rollout.SDERecorder.result)


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
    # compared on resume (checkpoints.config_changes); the card shows a lever only when it is on (model_card.LEVERS_OFF)
    knobs = ("beta", "pair_strategy", "min_reward_margin", "update_split", "pair_weighting", "chosen_sft_weight",
             "winner_preserving", "winner_preserving_mu", "ref_update_every", "ref_update_alpha", "norm_guard_weight",
             "norm_guard_tolerance", "train_timesteps")
    uses_old_adapter = False
    official_update_split = "all"  # what update_split "" means for dpo (today's behaviour)

    def __init__(self, config):
        self.config = config

    def samples_with_old(self, optimizer_steps: int) -> bool:
        return False

    def update(self, policy, rollouts: Rollouts, prompt_cache, step: int) -> tuple[dict, torch.Tensor]:
        """-> (metrics, pairs [P, 2] of (chosen, rejected) row indices, for the sample grid)."""
        from dpo_loss import margin_pair_weights
        from pairing import interleave, pair_stats, select_pairs, tied_candidates

        config, accelerator = self.config, policy.accelerator
        group_ids, rewards, latents, prompts = rollouts.group_ids, rollouts.rewards, rollouts.latents, rollouts.prompts
        pairs = select_pairs(group_ids, rewards, config.pair_strategy, config.min_reward_margin)  # [P, 2]
        stats = pair_stats(group_ids, rewards, pairs)
        tied, candidates = tied_candidates(group_ids, rewards, config.pair_strategy)
        margins = (rewards[pairs[:, 0]] - rewards[pairs[:, 1]]).double()  # [P], > min_reward_margin
        pair_weights = None
        if getattr(config, "pair_weighting", "none") == "margin":  # GPO-style: weight by the reward margin
            margin_sum, pair_count = all_sum(accelerator, float(margins.sum()), pairs.shape[0])
            pair_weights = margin_pair_weights(margins, margin_sum / max(pair_count, 1))
        if config.reverse_preference:
            pairs = pairs.flip(1)
        n_pairs = pairs.shape[0]
        timesteps = max(1, config.train_timesteps)  # 0: Diffusion-DPO's one draw per pair and update
        device = accelerator.device
        if n_pairs:
            chosen_rejected_latents = interleave(pairs, latents).to(device)  # [2P, S, 64]
            pair_prompts = interleave(pairs, prompts)
        else:  # no pair on this rank: placeholder rows, zero weight, so it still joins every collective
            chosen_rejected_latents, pair_prompts = latents[:2].to(device), prompts[:2]
        metrics = dpo_update(policy, chosen_rejected_latents, pair_prompts, n_pairs, prompt_cache, step,
                             updates=config.updates_per_rollout,
                             split=getattr(config, "update_split", "") or self.official_update_split,
                             pair_weights=pair_weights, timesteps=timesteps)
        metrics["perf/update_tflop"] = perf.update_tflop(config, policy.transformer.config, prompt_cache, pair_prompts,
                                                         2 * config.micro_batch_pairs,
                                                         forwards_per_row=timesteps) if n_pairs else 0.0
        if (getattr(config, "update_split", "") or self.official_update_split) == "disjoint":  # each pair once
            metrics["perf/update_tflop"] /= config.updates_per_rollout
        if "update/skipped_no_pairs" in metrics:
            accelerator.print(f"step {step}: no pairs (every group tied or below min_reward_margin); update skipped")
        pairs_total, tie_groups, no_pair_groups, gap_sum, tied_total, candidates_total = all_sum(
            accelerator, n_pairs, stats["tie_groups"], stats["groups_without_pair"], stats["reward_gap_mean"] * n_pairs,
            tied, candidates)
        # pairs/reward_gap: the trained pairs' mean chosen - rejected reward; pairs/tied_fraction: the
        # pair_strategy's candidate pairs with equal rewards (margin 0), never trained
        metrics.update({"pairs/kept": pairs_total, "pairs/tie_groups_dropped": tie_groups,
                        "pairs/groups_without_pair": no_pair_groups, "pairs/reward_gap": gap_sum / max(pairs_total, 1),
                        "pairs/tied_fraction": tied_total / max(candidates_total, 1)})
        return metrics, pairs


GROUP_SIGMA_SCHEMES = ("sampler", "sampler_stratified", "sampler_first")  # besides pairing.SIGMA_SCHEMES


class GroupObjective:
    """The update shared by the group-wise objectives; a subclass defines `loss` (and its knobs)."""

    name = ""
    knobs: tuple[str, ...] = ()  # the config fields of this objective, compared on resume
    units = "samples"  # what the loss averages over: "samples" or "groups"
    uses_old_adapter = True  # an old (EMA) LoRA adapter exists (memory; sampling and/or the loss)
    needs_reference = True
    ratio_to_rollout = False  # AWM: the loss needs the rollout policy's likelihood (precomputed per update)
    old_ema_per_optimizer_step = False  # DGPO: the old EMA steps after every optimizer step (NFT, AWM: per rollout)
    shared_noise = False  # one noise per group (DGPO's `use_shared_noise`) or per sample (NFT, AWM: randn_like)
    official_sigma_scheme = "logit_normal"  # what sigma_scheme "" means for this objective
    official_update_split = "disjoint"  # every official script uses each sample once per rollout batch
    ema = "0,0,0"  # the old adapter's EMA schedule (parse_ema), of the optimizer-step count

    def __init__(self, config):
        self.config = config
        self.sigma_scheme = config.sigma_scheme or self.official_sigma_scheme
        self.update_split = config.update_split or self.official_update_split
        # timesteps per trained sample per optimizer step (gradients accumulate over them)
        self.timesteps = config.train_timesteps or self.official_timesteps(config)

    @property
    def needs_old_prediction(self) -> bool:
        """Whether the loss runs the old adapter's forward (DGPO: only with its clip)."""
        return self.uses_old_adapter

    def official_timesteps(self, config) -> int:
        return 1

    def samples_with_old(self, optimizer_steps: int) -> bool:
        """Whether this step's rollouts are sampled with the old adapter."""
        return False

    def loss(self, model_pred, ref_pred, old_pred, target, sigmas, advantages, group_index, rollout_logp=None):
        raise NotImplementedError

    def advantages(self, rollouts: Rollouts, accelerator):
        return objective_grpo.group_advantages_for(self.config, rollouts, accelerator)

    def batch_of(self, accelerator, advantages, groups: list[list[int]]) -> TrainedGroups | None:
        """These groups of this rank as one optimizer step's batch; None when no rank has a group."""
        groups_total, rows_total = all_sum(accelerator, len(groups), sum(len(g) for g in groups))
        if rows_total == 0:
            return None
        per_micro = self.config.micro_batch_groups
        n_micro = int(all_max(accelerator, max(1, math.ceil(len(groups) / per_micro))))
        placeholder = [list(range(self.config.samples_per_prompt))]  # joins the collectives with zero weight
        return TrainedGroups(advantages, groups or placeholder, len(groups), int(groups_total), int(rows_total),
                             per_micro, n_micro)

    def trained_groups(self, rollouts: Rollouts, accelerator, step: int) -> tuple[TrainedGroups | None, dict]:
        """-> (the groups to train, None when no rank has one; the adv/* metrics). Tied groups (A = 0)
        are trained too, as the official scripts do, unless drop_tied_groups."""
        advantages, keep, group_index, stats = self.advantages(rollouts, accelerator)
        trained = keep if self.config.drop_tied_groups else torch.ones_like(keep)
        by_group: dict[int, list[int]] = {}
        for row in torch.nonzero(trained).flatten().tolist():
            by_group.setdefault(int(group_index[row]), []).append(row)
        metrics = objective_grpo.advantage_metrics(accelerator, stats, advantages[trained], self.config.drop_tied_groups)
        batch = self.batch_of(accelerator, advantages, list(by_group.values()))
        if batch is None:
            accelerator.print(f"step {step}: every group has equal rewards (drop_tied_groups); update skipped")
            metrics["update/skipped_no_groups"] = 1.0
        return batch, metrics

    def update_parts(self, rollouts: Rollouts, batch: TrainedGroups, accelerator, step: int) -> list:
        """-> [(update index, its batch)]: "all": the whole batch at every update; "disjoint": the
        groups of all ranks cut into updates_per_rollout parts (objective_grpo.split_parts: the same
        on any number of ranks), one per optimizer step, each group used once (empty parts left out)."""
        n = self.config.updates_per_rollout
        if self.update_split == "all":
            return [(u, batch) for u in range(n)]
        real = batch.groups[:batch.n_groups]
        part_of = objective_grpo.split_parts(accelerator, objective_grpo.unit_keys(rollouts.group_ids, real), n,
                                             self.config.seed, step)
        parts = [(u, self.batch_of(accelerator, batch.advantages, [g for g, p in zip(real, part_of) if p == u]))
                 for u in range(n)]
        return [(u, part) for u, part in parts if part is not None]

    def _draws(self, policy, rollouts, groups_list, step, shape, updates) -> dict:
        """-> {update: [(noise [M, *shape], sigmas [M]) per trained timestep]} for the rows of
        `groups_list` in order, `self.timesteps` timesteps per update. Everything a group draws comes
        from generators seeded by (seed, step, update, timestep, its id), so the same on any number of
        ranks and in any part. Noise: one per group (shared_noise) or per row. Sigmas per `sigma_scheme`:
        logit_normal / uniform / mode: one per group and timestep (pairing.sample_sigmas);
        "sampler": per row, the sampler's own sigmas (qwen_image_rollout.sampler_sigmas) in a random
        order per row, the update's timesteps taking the next ones (official NFT: each sample's
        `timesteps` permuted, its first int(0.99 n) trained in one optimizer step, train_nft_sd3.py);
        "sampler_stratified": per group and update, one sampler step index per stratum of 1 ..
        int(0.9 n), strata = the timesteps (official AWM `time_type = "discrete_wo_init"`, 6
        timesteps in one optimizer step); "sampler_first": distinct indices among the first
        first_steps_available steps, shared by every group (official DGPO `generate_shared_sampled_timesteps`:
        drawn once per rollout batch; here per update with update_split all)."""
        from pairing import sample_sigmas

        config, scheme, T = self.config, self.sigma_scheme, self.timesteps
        schedule = policy.sampler_sigmas() if scheme in GROUP_SIGMA_SCHEMES else None  # [n_steps]
        keys = [zlib.crc32(rollouts.group_ids[g[0]].encode()) for g in groups_list]
        if scheme == "sampler":
            per_group = [torch.Generator().manual_seed(derived_seed("group_timesteps", config.seed, step, key))
                         for key in keys]
            orders = [[torch.randperm(len(schedule), generator=gen) for _ in g] for gen, g in zip(per_group, groups_list)]
        draws = {}
        for update in updates:
            if scheme == "sampler_first":
                shared = torch.Generator().manual_seed(derived_seed(
                    "dgpo_timesteps", config.seed, step, update if self.update_split == "all" else 0))
                first = torch.randperm(first_steps_available(len(schedule), config.dgpo_first_steps_fraction),
                                       generator=shared)
            draws[update] = []
            for k in range(T):
                noises, sigmas = [], []
                for number, (key, g) in enumerate(zip(keys, groups_list)):
                    gen = torch.Generator().manual_seed(derived_seed("group_noise", config.seed, step, update, key, k))
                    if self.shared_noise:
                        noises.append(torch.randn(tuple(shape), generator=gen).expand(len(g), *shape))
                    else:
                        noises.append(torch.randn((len(g), *shape), generator=gen))
                    if scheme == "sampler":
                        slot = (update * T + k) % len(schedule)
                        sigmas.append(torch.stack([schedule[order[slot]] for order in orders[number]]))
                    elif scheme == "sampler_stratified":
                        strata = torch.Generator().manual_seed(derived_seed("group_strata", config.seed, step, update, key))
                        index = stratified_sampler_indices(len(schedule), T, 0.9, torch.rand(T, generator=strata))
                        sigmas.append(schedule[index[k]].expand(len(g)))
                    elif scheme == "sampler_first":
                        sigmas.append(schedule[first[k % len(first)]].expand(len(g)))
                    else:
                        sigma = sample_sigmas(1, scheme, gen, logit_mean=config.logit_mean, logit_std=config.logit_std)
                        sigmas.append(sigma.float().expand(len(g)))
                draws[update].append((torch.cat(noises), torch.cat(sigmas).float()))
        return draws

    def update(self, policy, rollouts: Rollouts, prompt_cache, step: int) -> tuple[dict, torch.Tensor]:
        """`updates_per_rollout` optimizer steps (update_parts), each accumulating over its groups'
        micro-batches and `timesteps` trained timesteps; the loss is the mean over every unit (sample
        or group) and timestep of the step's part on every rank. -> (metrics, best/worst pairs)."""
        from dpo_loss import velocity_target
        from pairing import select_pairs

        config, accelerator = self.config, policy.accelerator
        world, device = accelerator.num_processes, accelerator.device
        batch, metrics = self.trained_groups(rollouts, accelerator, step)
        grid_pairs = select_pairs(rollouts.group_ids, rollouts.rewards, "best_worst")
        if batch is None:
            return metrics, grid_pairs
        parts = [self._prepare(policy, rollouts, part, update, step, device)
                 for update, part in self.update_parts(rollouts, batch, accelerator, step)]
        rollout_logp = self._rollout_likelihoods(policy, prompt_cache, parts, device)
        totals, good_updates, decay, tflop = {}, 0, None, 0.0
        for number, p in enumerate(parts):
            part, units_total, T = p["batch"], p["units_total"], len(p["draws"])
            sums = {}
            for k, (noise, sigmas) in enumerate(p["draws"]):
                target = velocity_target(p["x0"], noise)
                for micro, rows, units, weight, first in p["micro_batches"]():
                    args = (p["x0"][rows], noise[rows], sigmas[rows],
                            *policy.conditioning(prompt_cache, p["prompts"][rows], device))
                    ref_pred = policy.reference_velocity(*args) if self.needs_reference else None
                    old_pred = policy.old_velocity(*args) if self.needs_old_prediction else None
                    with policy.no_sync(micro == part.n_micro - 1 and k == T - 1):
                        model_pred = policy.velocity(*args)
                        loss, m = self.loss(model_pred, ref_pred, old_pred, target[rows], sigmas[rows], p["adv"][rows],
                                            p["dense_group"][rows] - first,
                                            rollout_logp=rollout_logp[number][k][rows] if number > 0 and rollout_logp else None)
                        # DDP / FSDP average gradients over ranks: scale to the global mean over units and timesteps
                        accelerator.backward(loss * (weight * units * world / (units_total * T)))
                    for key, value in m.items():
                        sums[key] = sums.get(key, 0.0) + weight * value * units / (units_total * T)
            if policy.optimizer_step(math.isfinite(sums["loss"]), step, metrics):
                good_updates += 1
                for key, value in sums.items():
                    totals[key] = totals.get(key, 0.0) + value
                if self.uses_old_adapter and self.old_ema_per_optimizer_step:
                    # official DGPO: ema_ref.step after each optimizer step, decay min(0.3, 0.001 * global_step)
                    # with global_step = the optimizer steps before this one
                    decay = ema_decay(self.ema, policy.optimizer_steps - 1)
                    policy.update_old(decay)
            if part.n_groups:
                tflop += perf.update_tflop(config, policy.transformer.config, prompt_cache, p["prompts"],
                                           config.samples_per_prompt * part.per_micro, reference=self.needs_reference,
                                           old=self.needs_old_prediction, forwards_per_row=T, updates=1,
                                           extra_policy_forwards=T if number > 0 and self.ratio_to_rollout else 0)
        metrics["perf/update_tflop"] = tflop
        if self.uses_old_adapter and not self.old_ema_per_optimizer_step:
            # official NFT / AWM: once per rollout batch, after its optimizer steps, with the decay of
            # the optimizer-step count (`global_step` in scripts/train_nft_sd3.py, train_sd3_awm.py)
            decay = ema_decay(self.ema, policy.optimizer_steps)
            policy.update_old(decay)
        if decay is not None:
            metrics["old/ema_decay"] = decay
        metrics["update/optimizer_steps"] = float(policy.optimizer_steps)
        metrics["update/timesteps_per_sample"] = float(self.timesteps)
        metrics.update(mean_metrics(accelerator, self.name, totals, 1.0, good_updates))
        return metrics, grid_pairs

    def _prepare(self, policy, rollouts, part: TrainedGroups, update: int, step: int, device) -> dict:
        """One optimizer step's tensors: its rows' clean latents, prompts, advantages, dense group
        numbers, its draws, and its micro-batches -> (micro, rows, units, weight, first group)."""
        order = part.order
        x0 = rollouts.latents[order].to(device)  # [M, S, 64], whole groups in a row
        draws = self._draws(policy, rollouts, part.groups, step, x0.shape[1:], [update])[update]

        def micro_batches():
            for micro, rows, n_rows, n_groups, weight, first in part.micro_batches():
                yield micro, rows, (n_groups if self.units == "groups" else n_rows), weight, first

        return {"batch": part, "x0": x0, "prompts": [rollouts.prompts[i] for i in order],
                "adv": part.advantages[order].to(device), "micro_batches": micro_batches,
                "dense_group": torch.tensor([n for n, g in enumerate(part.groups) for _ in g]),
                "units_total": part.groups_total if self.units == "groups" else part.rows_total,
                "draws": [(noise.to(device, x0.dtype), sigmas.to(device)) for noise, sigmas in draws]}

    def _rollout_likelihoods(self, policy, prompt_cache, parts, device):
        """AWM (ratio_to_rollout): [part][timestep][M] the likelihood of every later part's (noise,
        sigma) under the weights that sampled the rollouts, computed before the first optimizer step
        (as the official on-policy recipe computes its `old_log_probs`); the first part needs none
        (its own prediction, detached). Every rank runs the same forwards (padding included)."""
        if not self.ratio_to_rollout or len(parts) < 2:
            return None
        from dpo_loss import velocity_target

        out = [None]
        for p in parts[1:]:
            per_timestep = []
            for noise, sigmas in p["draws"]:
                target = velocity_target(p["x0"], noise)
                logp = torch.zeros(p["x0"].shape[0], device=device)
                for _, rows, _, _, _ in p["micro_batches"]():
                    args = (p["x0"][rows], noise[rows], sigmas[rows],
                            *policy.conditioning(prompt_cache, p["prompts"][rows], device))
                    with torch.no_grad():
                        logp[rows] = self.likelihood(policy.velocity(*args), target[rows], sigmas[rows])
                per_timestep.append(logp)
            out.append(per_timestep)
        return out

COMMON_GROUP_KNOBS = ("advantage_std", "drop_tied_groups", "sigma_scheme", "update_split", "train_timesteps")


class DGPO(GroupObjective):
    """group_losses.dgpo_loss: (1/beta) * -logsigmoid((1/K) sum_i A_i * -beta (err_model_i - err_ref_i))
    per group (the official gradient). Knobs: dgpo_beta, dgpo_kl_weight, dgpo_exact_gradient,
    dgpo_clip_range (> 0: the official PPO-style clip on each sample's error against the old adapter),
    dgpo_old_ema (that adapter: an EMA stepped after every optimizer step; rollouts are sampled with
    it once more than dgpo_switch_ema_ref optimizer steps are done, with or without the clip, as the
    official script), dgpo_first_steps_fraction (the official timesteps: `timesteps` distinct steps
    among the sampler's first ones, shared by the whole batch, sigma_scheme "sampler_first")."""

    name, units = "dgpo", "groups"
    knobs = COMMON_GROUP_KNOBS + ("dgpo_beta", "dgpo_kl_weight", "dgpo_exact_gradient", "dgpo_clip_range",
                                  "dgpo_old_ema", "dgpo_switch_ema_ref", "dgpo_first_steps_fraction")
    old_ema_per_optimizer_step = True
    shared_noise = True  # official config/dgpo.py `use_shared_noise = True`
    official_sigma_scheme = "sampler_first"  # official scripts/train_sd3_dgpo.py generate_shared_sampled_timesteps

    def __init__(self, config):
        super().__init__(config)
        self.ema = config.dgpo_old_ema

    @property
    def needs_old_prediction(self) -> bool:
        return self.config.dgpo_clip_range > 0  # official: the old forward only with clip_dsm / clip_kl

    def official_timesteps(self, config) -> int:
        # official config/dgpo.py `num_train_timesteps = 4`, at most the steps it draws from
        return min(4, first_steps_available(config.num_inference_steps, config.dgpo_first_steps_fraction))

    def samples_with_old(self, optimizer_steps: int) -> bool:
        # official scripts/train_sd3_dgpo.py: `if global_step > config.switch_ema_ref: ema_ref.copy_ema_to(...)`
        # before sampling, whatever the clip
        return optimizer_steps > self.config.dgpo_switch_ema_ref

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

    def official_timesteps(self, config) -> int:
        # official scripts/train_nft_sd3.py: num_train_timesteps = int(num_steps * timestep_fraction 0.99)
        return max(1, int(config.num_inference_steps * 0.99))

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

    def official_timesteps(self, config) -> int:
        return 6  # official config/dgx_awm.py ocr_sd3_no_cfg_1node: train.train_timesteps = 6

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


OBJECTIVES = {"dpo": DPO, "dgpo": DGPO, "nft": NFT, "awm": AWM, "grpo": objective_grpo.GRPO}


def build(config):
    return OBJECTIVES[config.objective](config)
