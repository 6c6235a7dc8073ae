"""Preference pairs from groups of scored samples, and the noise / sigma each pair shares. Torch only
(diffusers is imported lazily, for its "mode" sigma scheme).

A "group" is the K samples of one prompt. Pairs never cross groups. A pair is
(chosen_index, rejected_index) into the flat batch of samples; the training batch is laid out
interleaved, [c0, r0, c1, r1, ...] (see `interleave`), which is the layout `dpo_loss` expects.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

PAIR_STRATEGIES = ("best_worst", "top_bottom", "all")
SIGMA_SCHEMES = ("logit_normal", "uniform", "mode")


def _group_key(g):
    return g.item() if isinstance(g, torch.Tensor) else g


def _groups_in_order(group_ids) -> dict:
    """group id -> list of flat indices, groups in order of first appearance."""
    groups: dict = {}
    for index, g in enumerate(group_ids):
        groups.setdefault(_group_key(g), []).append(index)
    return groups


def select_pairs(group_ids: Sequence | torch.Tensor, rewards: torch.Tensor, strategy: str = "best_worst",
                 min_margin: float = 0.0) -> torch.LongTensor:
    """-> LongTensor [P, 2] of (chosen_index, rejected_index).

    - "best_worst": one pair per group, its highest vs its lowest reward;
    - "top_bottom": floor(K/2) disjoint pairs per group, i-th best vs i-th worst (every rollout used);
    - "all": every pair of a group's samples, the better one chosen (K(K-1)/2 before ties are dropped):
      every comparison the group's ranking holds, not only its extremes.
    A pair is kept only if reward(chosen) - reward(rejected) > min_margin, so ties never pair, even
    with min_margin = 0. Deterministic: groups in order of first appearance, pairs within a group
    best first, equal rewards ordered by index.
    """
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"strategy must be one of {PAIR_STRATEGIES}, got {strategy!r}")
    rewards = torch.as_tensor(rewards).detach().to("cpu", torch.float64).reshape(-1)
    if len(group_ids) != rewards.numel():
        raise ValueError(f"{len(group_ids)} group ids but {rewards.numel()} rewards")
    nan = torch.nonzero(~torch.isfinite(rewards)).flatten()
    if nan.numel():
        raise ValueError(f"reward at index {int(nan[0])} is {rewards[nan[0]].item()}: rewards must be finite")
    if not (math.isfinite(min_margin) and min_margin >= 0):
        raise ValueError(f"min_margin must be finite and >= 0, got {min_margin}")

    values = rewards.tolist()
    pairs = [(c, r) for c, r in _candidate_pairs(group_ids, values, strategy) if values[c] - values[r] > min_margin]
    return torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)


def _candidate_pairs(group_ids, values: list, strategy: str) -> list[tuple[int, int]]:
    """The strategy's (chosen, rejected) pairs before the margin filter (ties included)."""
    pairs = []
    for members in _groups_in_order(group_ids).values():
        ranked = sorted(members, key=lambda i: (-values[i], i))  # best first, ties by index
        if strategy == "all":
            pairs += [(ranked[a], ranked[b]) for a in range(len(ranked)) for b in range(a + 1, len(ranked))]
            continue
        n_pairs = 1 if strategy == "best_worst" else len(ranked) // 2
        for k in range(n_pairs if len(ranked) >= 2 else 0):
            pairs.append((ranked[k], ranked[len(ranked) - 1 - k]))
    return pairs


def tied_candidates(group_ids: Sequence, rewards: torch.Tensor, strategy: str = "best_worst") -> tuple[int, int]:
    """-> (tied, candidates): how many of the strategy's candidate pairs have equal rewards (margin 0:
    never trained, select_pairs drops them) out of how many. top_bottom's inner pairs tie often."""
    values = torch.as_tensor(rewards).detach().to("cpu", torch.float64).reshape(-1).tolist()
    candidates = _candidate_pairs(group_ids, values, strategy)
    return sum(1 for c, r in candidates if values[c] == values[r]), len(candidates)


UPDATE_SPLITS = ("all", "disjoint")


def update_parts(n_pairs: int, updates: int, split: str = "all") -> list[tuple[int, int]]:
    """The pairs [lo, hi) each of `updates` optimizer steps trains on: "all" every pair each time;
    "disjoint" consecutive, near-equal parts (the first n_pairs % updates one longer), each pair
    in exactly one update (a part may be empty when n_pairs < updates)."""
    if split not in UPDATE_SPLITS:
        raise ValueError(f"split must be one of {UPDATE_SPLITS}, got {split!r}")
    if split == "all":
        return [(0, n_pairs)] * updates
    base, extra = divmod(n_pairs, updates)
    bounds, lo = [], 0
    for u in range(updates):
        hi = lo + base + (1 if u < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def interleave(pairs: torch.Tensor, items):
    """Gather per-sample items into [c0, r0, c1, r1, ...]. Tensors are indexed along dim 0 (on
    their own device); lists and tuples give lists."""
    order = pairs.reshape(-1)
    if isinstance(items, torch.Tensor):
        return items.index_select(0, order.to(items.device))
    return [items[i] for i in order.tolist()]


def validate_pairs(group_ids_interleaved: Sequence, rewards_interleaved) -> None:
    """Raises ValueError naming the pair if rows 2i and 2i+1 come from different groups or the
    chosen reward is below the rejected one."""
    rewards = torch.as_tensor(rewards_interleaved).detach().to("cpu", torch.float64).reshape(-1).tolist()
    if len(group_ids_interleaved) % 2 or len(rewards) != len(group_ids_interleaved):
        raise ValueError(f"need an even number of rows and one reward per row, got {len(group_ids_interleaved)} "
                         f"group ids and {len(rewards)} rewards")
    for p in range(len(rewards) // 2):
        gw, gl = _group_key(group_ids_interleaved[2 * p]), _group_key(group_ids_interleaved[2 * p + 1])
        if gw != gl:
            raise ValueError(f"pair {p}: chosen is from group {gw!r} but rejected from group {gl!r}")
        if rewards[2 * p] < rewards[2 * p + 1]:
            raise ValueError(f"pair {p}: chosen reward {rewards[2 * p]} < rejected reward {rewards[2 * p + 1]}")


def pair_stats(group_ids: Sequence, rewards: torch.Tensor, pairs: torch.Tensor) -> dict[str, float]:
    """Logging: pairs kept, groups that gave no pair (ties or below margin), reward gap of the pairs."""
    rewards = torch.as_tensor(rewards).detach().to("cpu", torch.float64).reshape(-1)
    groups = _groups_in_order(group_ids)
    paired = {_group_key(group_ids[int(c)]) for c in pairs[:, 0]} if pairs.numel() else set()
    gaps = rewards[pairs[:, 0]] - rewards[pairs[:, 1]] if pairs.numel() else torch.zeros(0)
    return {
        "pairs_kept": float(pairs.shape[0]),
        "groups": float(len(groups)),
        "groups_without_pair": float(len(groups) - len(paired)),
        "tie_groups": float(sum(1 for m in groups.values() if len(m) > 1 and bool((rewards[m] == rewards[m[0]]).all()))),
        "reward_gap_mean": gaps.mean().item() if gaps.numel() else 0.0,
    }


def sample_sigmas(n: int, scheme: str = "logit_normal", generator: torch.Generator | None = None,
                  logit_mean: float = 0.0, logit_std: float = 1.0, mode_scale: float = 1.29) -> torch.Tensor:
    """n sigmas in (0, 1): "logit_normal" sigmoid(N(mean, std)) (the recipe), "uniform", or SD3's
    "mode" density (diffusers' `compute_density_for_timestep_sampling`)."""
    if scheme == "logit_normal":
        return torch.sigmoid(torch.randn(n, generator=generator) * logit_std + logit_mean)
    if scheme == "uniform":
        return torch.rand(n, generator=generator)
    if scheme == "mode":
        from diffusers.training_utils import compute_density_for_timestep_sampling

        return compute_density_for_timestep_sampling("mode", n, mode_scale=mode_scale, generator=generator)
    raise ValueError(f"sigma scheme must be one of {SIGMA_SCHEMES}, got {scheme!r}")


def sample_pair_noise_and_sigmas(latents: torch.Tensor, generator: torch.Generator, scheme: str = "logit_normal",
                                 **scheme_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """For interleaved clean latents [2P, ...]: one Gaussian noise and one sigma per pair, repeated
    for both rows -> (noise like latents, sigmas [2P]). Drawn on the generator's device (CPU
    generator: CPU draws, then moved), so the same generator state gives the same draws anywhere."""
    if latents.shape[0] % 2:
        raise ValueError(f"latents must hold whole pairs, got {latents.shape[0]} rows")
    n_pairs = latents.shape[0] // 2
    noise = torch.randn((n_pairs, *latents.shape[1:]), generator=generator, dtype=torch.float32)
    sigmas = sample_sigmas(n_pairs, scheme, generator, **scheme_kwargs)
    noise = noise.repeat_interleave(2, dim=0).to(latents.device, latents.dtype)
    return noise, sigmas.repeat_interleave(2).to(latents.device)
