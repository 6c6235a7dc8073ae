"""Flow-GRPO's objective (`GRPO`, registered in objectives.OBJECTIVES) and what it shares with the
group objectives of objectives.py: the advantages and their metrics, the trained batch
(`TrainedGroups`), and the split of one rollout batch into the optimizer steps of an update
(`update_split`: split_parts).

The official scripts (yifan123/flow_grpo scripts/train_sd3.py and train_sd3_fast.py, the training
part after the advantages) do, per rank:
  1. drop every sample whose advantage is exactly 0 (`mask = advantages.abs().sum(dim=1) != 0`);
  2. if the kept count is not a multiple of `num_batches_per_epoch`, put back just enough
     zero-advantage samples, picked at random, to make it one (when there are enough of them);
  3. per inner epoch (one): shuffle (train_sd3.py `torch.randperm`), cut into `num_batches_per_epoch`
     equal parts, and accumulate the gradients over every trained timestep of the parts of one
     optimizer step (`gradient_accumulation_steps` parts): each kept sample is used once.
Here the same, over all ranks at once so the result does not depend on the number of ranks: the
kept rows of every rank are gathered, ordered by a draw from (seed, step, row), padded with
zero-advantage rows (the first in that order) to a multiple of the optimizer steps, and cut into
`updates_per_rollout` nearly equal parts, one optimizer step each ("disjoint"); "all" trains every
kept row in each of the updates (the old behaviour). grpo_keep_zero_advantage trains the tied
samples too (A = 0: only their KL term acts).

Imports nothing from objectives.py (which imports this module)."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

import perf
from distributed import all_max, all_sum, gather_object
from prompt_data import derived_seed


def mean_metrics(accelerator, prefix: str, totals: dict, units_total: float, good_updates: int) -> dict:
    """Sums of unit-weighted metric values (this rank, every good update) -> their means over all ranks."""
    if not good_updates:
        return {}
    keys = sorted(totals)
    summed = all_sum(accelerator, *[totals[k] for k in keys])
    return {f"{prefix}/{k}": v / (units_total * good_updates) for k, v in zip(keys, summed)}


def group_advantages_for(config, rollouts, accelerator):
    """group_losses.group_advantages of the step's rewards with the config's scale (advantage_std);
    negated under reverse_preference. -> (advantages [N], keep [N], group_index [N], stats)."""
    from group_losses import group_advantages

    std = "group"
    if config.advantage_std == "global":
        # one scale: the std of every reward of the step (all ranks) + 1e-4, as the official
        # `sample.global_std = True` (flow_grpo/stat_tracking.py: np.std(rewards) + 1e-4)
        everything = accelerator.gather(rollouts.rewards.to(accelerator.device)) if accelerator.num_processes > 1 \
            else rollouts.rewards
        std = everything.double().std(unbiased=False).item() + 1e-4
    advantages, keep, group_index, stats = group_advantages(rollouts.rewards, rollouts.group_ids, std=std,
                                                            group_size=config.samples_per_prompt)
    if config.reverse_preference:  # control run: train towards the worse samples
        advantages = -advantages
    return advantages, keep, group_index, stats


def advantage_metrics(accelerator, stats, trained_advantages, dropped: bool) -> dict:
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


def unit_keys(group_ids: list[str], units: list[list[int]]) -> list[int]:
    """A key per unit (a list of rows of one group): crc32 of its group id, times 4096, plus the
    position of its first row in the group, so a group's key and its rows' keys are stable."""
    first_of_group: dict[str, int] = {}
    for row, g in enumerate(group_ids):
        first_of_group.setdefault(g, row)
    return [zlib.crc32(group_ids[u[0]].encode()) * 4096 + (u[0] - first_of_group[group_ids[u[0]]]) for u in units]


def shuffled(keys, seed: int, step: int) -> list[int]:
    """The keys in the order of a draw from (seed, step, key): the official shuffle before rebatching."""
    return sorted(keys, key=lambda k: (derived_seed("update_split", seed, step, k), k))


def split_parts(accelerator, keys: list[int], n_parts: int, seed: int, step: int) -> list[int]:
    """-> the part (optimizer step) of each of this rank's units: every rank's keys gathered, shuffled
    (`shuffled`) and cut into n_parts contiguous parts of nearly equal size (the larger first)."""
    everything = shuffled({k for rank_keys in gather_object(accelerator, list(keys)) for k in rank_keys}, seed, step)
    size, extra = divmod(len(everything), n_parts)
    part_of, start = {}, 0
    for part in range(n_parts):
        end = start + size + (1 if part < extra else 0)
        part_of.update({k: part for k in everything[start:end]})
        start = end
    return [part_of[k] for k in keys]


def padding_rows(accelerator, zero_keys: list[int], kept_total: int, n_parts: int, seed: int, step: int) -> set[int]:
    """The official padding (step 2 above), over all ranks: the keys of the zero-advantage rows put back."""
    need = (n_parts - kept_total % n_parts) % n_parts
    if need == 0:
        return set()
    zeros = shuffled({k for rank_keys in gather_object(accelerator, list(zero_keys)) for k in rank_keys}, seed, step)
    return set(zeros[:need]) if len(zeros) >= need else set()


def trained_rows(objective, rollouts, accelerator, step: int, n_parts: int, split: str):
    """-> (advantages [N], rows trained [list of row indices], the part of each, metrics) for grpo."""
    config = objective.config
    advantages, _, _, stats = group_advantages_for(config, rollouts, accelerator)
    rows = list(range(len(rollouts.group_ids)))
    keys = unit_keys(rollouts.group_ids, [[r] for r in rows])
    keep_zero = config.grpo_keep_zero_advantage
    kept = [r for r in rows if keep_zero or advantages[r] != 0]
    padded = []
    if not keep_zero and split == "disjoint":
        kept_total = int(all_sum(accelerator, len(kept))[0])
        put_back = padding_rows(accelerator, [keys[r] for r in rows if advantages[r] == 0], kept_total, n_parts,
                                config.seed, step)
        padded = [r for r in rows if advantages[r] == 0 and keys[r] in put_back]
        kept += padded
    kept.sort()
    parts = split_parts(accelerator, [keys[r] for r in kept], n_parts, config.seed, step) if split == "disjoint" \
        else [None] * len(kept)
    metrics = advantage_metrics(accelerator, stats, advantages[kept], dropped=not keep_zero)
    zero_total, padded_total = all_sum(accelerator, float((advantages == 0).sum()), float(len(padded)))
    metrics["adv/zero_advantage_samples"] = zero_total
    metrics["adv/zero_advantage_samples_padded"] = padded_total
    return advantages, kept, parts, metrics


def micro_slices(accelerator, n_rows: int, per_micro: int):
    """-> [(slice, n, weight)] over n_rows rows; every rank runs the same count (the largest), a rank
    with fewer runs zero-weight padding micro-batches on its row 0 (same work, no contribution)."""
    n_micro = int(all_max(accelerator, max(1, math.ceil(n_rows / per_micro))))
    out = []
    for micro in range(n_micro):
        first, last = micro * per_micro, min((micro + 1) * per_micro, n_rows)
        out.append((slice(first, last), last - first, 1.0) if last > first else (slice(0, 1), 1, 0.0))
    return out


def update(objective, policy, rollouts, prompt_cache, step: int) -> tuple[dict, torch.Tensor]:
    """`updates_per_rollout` optimizer steps ("disjoint": each over its part of the kept rows; "all":
    each over every kept row), each accumulating over every trained SDE step of its rows; the loss
    is the mean over the step's (row, trained step) of every rank. -> (metrics, pairs for the grid)."""
    from flow_grpo import grpo_loss
    from pairing import select_pairs

    config, accelerator = objective.config, policy.accelerator
    world, device = accelerator.num_processes, accelerator.device
    trajectory = rollouts.trajectory
    if trajectory is None:
        raise ValueError("objective grpo needs the SDE rollout's trajectory (Rollouts.trajectory)")
    n_updates, split = config.updates_per_rollout, objective.update_split
    advantages, kept, parts, metrics = trained_rows(objective, rollouts, accelerator, step, n_updates, split)
    grid_pairs = select_pairs(rollouts.group_ids, rollouts.rewards, "best_worst")
    if all_sum(accelerator, len(kept))[0] == 0:
        accelerator.print(f"step {step}: every sample has advantage 0; update skipped")
        metrics["update/skipped_no_groups"] = 1.0
        return metrics, grid_pairs
    n_steps = trajectory["log_probs"].shape[1]
    per_micro = config.micro_batch_groups * config.samples_per_prompt
    c = config
    totals, good_updates, tflop = {}, 0, 0.0
    trained_count = torch.zeros(len(rollouts.group_ids))  # how often each row was trained (a check)
    for update_index in range(n_updates):
        rows = kept if split == "all" else [r for r, p in zip(kept, parts) if p == update_index]
        rows_total = int(all_sum(accelerator, len(rows))[0])
        if rows_total == 0:  # more optimizer steps than rows
            continue
        units_total = rows_total * n_steps  # the loss is the mean over every (sample, trained step)
        order = torch.tensor(rows if rows else [0], dtype=torch.long)
        traj = {**trajectory, "before": trajectory["before"][order], "after": trajectory["after"][order]}
        old_log_probs = trajectory["log_probs"][order]  # [M, T]
        prompts = [rollouts.prompts[i] for i in order.tolist()]
        adv = advantages[order].to(device)
        slices = micro_slices(accelerator, len(rows), per_micro)
        sums = {}
        for micro, (part, n, weight) in enumerate(slices):
            weight = weight if rows else 0.0
            conditioning = policy.conditioning(prompt_cache, prompts[part], device)
            for j in range(n_steps):
                ref_mean = None
                if objective.needs_reference:
                    _, ref_mean, _ = objective.transition(policy, traj, part, j, conditioning, reference=True)
                with policy.no_sync(micro == len(slices) - 1 and j == n_steps - 1):
                    log_prob, mean, sigma_t = objective.transition(policy, traj, part, j, conditioning)
                    loss, m = grpo_loss(log_prob, old_log_probs[part, j].to(device), adv[part], c.grpo_clip_range,
                                        c.grpo_adv_clip, mean, ref_mean, sigma_t, c.grpo_kl_weight)
                    # DDP / FSDP average gradients over ranks: scale to the global mean over (sample, step)
                    accelerator.backward(loss * (weight * n * world / units_total))
                for key, value in m.items():
                    sums[key] = sums.get(key, 0.0) + weight * value * n / units_total
        if rows:
            trained_count[order] += 1
        if policy.optimizer_step(math.isfinite(sums["loss"]), step, metrics):
            good_updates += 1
            for key, value in sums.items():
                totals[key] = totals.get(key, 0.0) + value
        if rows:  # one policy forward + backward (+ the reference forward with the KL) per trained step per row
            tflop += perf.update_tflop(config, policy.transformer.config, prompt_cache, prompts, per_micro,
                                       reference=objective.needs_reference, old=False, forwards_per_row=n_steps,
                                       updates=1)
    metrics["perf/update_tflop"] = tflop
    metrics["grpo/trained_steps"] = float(n_steps)
    metrics["update/optimizer_steps"] = float(policy.optimizer_steps)
    metrics["grpo/max_uses_per_sample"] = float(trained_count.max())
    if good_updates:
        keys = sorted(totals)
        summed = all_sum(accelerator, *[totals[k] for k in keys])
        metrics.update({f"grpo/{k}": v / good_updates for k, v in zip(keys, summed)})
    return metrics, grid_pairs


class GRPO:
    """Flow-GRPO (flow_grpo.py): the rollout samples with the SDE (qwen_image_rollout.SDERecorder,
    started by the trainer through `recorder(step)`) and records each trained step's transition
    x_j -> x_{j+1} and its log-probability; `update` (above) drops the samples whose advantage is
    exactly 0, cuts the rest into one part per optimizer step and recomputes each trained step's
    log-probability under the current policy: PPO-clipped ratio to the clipped advantage, plus the
    KL to the reference (LoRA disabled) on the step means (official scripts/train_sd3.py). No old
    adapter: the old log-probs are the rollout's. Knobs: advantage_std, update_split, grpo_*."""

    name = "grpo"
    knobs = ("advantage_std", "update_split", "grpo_noise_level", "grpo_sde_window", "grpo_timestep_fraction",
             "grpo_clip_range", "grpo_adv_clip", "grpo_kl_weight", "grpo_keep_zero_advantage")
    uses_old_adapter = False
    official_update_split = "disjoint"  # official: each kept sample once per rollout batch

    def __init__(self, config):
        self.config = config
        self.update_split = config.update_split or self.official_update_split
        self.needs_reference = config.grpo_kl_weight > 0

    def samples_with_old(self, optimizer_steps: int) -> bool:
        return False

    def advantages(self, rollouts, accelerator):
        return group_advantages_for(self.config, rollouts, accelerator)

    def recorder(self, step: int = 0):
        """A fresh SDE recorder for one step's rollout (qir.rollout(..., scheduler_step=recorder.chunk_step));
        a "random:LENGTH" window starts where flow_grpo.resolve_window draws it for (seed, step)."""
        import flow_grpo
        import qwen_image_rollout as qir

        c = self.config
        # one window per rollout batch, the same on every rank (official: one per sampling call)
        window = flow_grpo.resolve_window(c.grpo_sde_window, c.num_inference_steps,
                                          derived_seed("grpo_sde_window", c.seed, step))
        sde, trained = flow_grpo.sde_steps(c.num_inference_steps, window, c.grpo_timestep_fraction)
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

    def update(self, policy, rollouts, prompt_cache, step: int) -> tuple[dict, torch.Tensor]:
        return update(self, policy, rollouts, prompt_cache, step)
