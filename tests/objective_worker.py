"""Runs each group objective's update on fixed, hand-made rollouts (no sampling): 4 prompt groups of
K = 4 random latents with fixed rewards, 2 steps of 2 updates, on however many processes it is
launched with; rank r takes its share of the groups. Writes OUT/<objective>/lora (the final LoRA)
and OUT/<objective>/metrics.json (rank 0). tests/test_objectives.py compares 1 process (called in
process) with 2 processes, DDP (`none`) and FSDP2 (`fsdp2`), in one launch:

    python -m torch.distributed.run --nproc_per_node 2 tests/objective_worker.py TINY_DIR OUT none:dgpo fsdp2:nft
writes OUT/none/dgpo/..., OUT/fsdp2/nft/...
"""

import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

GROUPS, K, STEPS = 4, 4, 2
PROMPTS = ["a red square", "a photo of a cat", "green grass", "a blue sky at noon"]


def config_for(objective: str, tiny_dir: str, sharding: str, extra=()):
    import train_online_dpo
    from run_config import parse_config

    # an old-adapter EMA that moves from the first step, so the old policy differs from the trained one
    return parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, [
        "--preset", "cpu_tiny", "--pretrained", tiny_dir, "--objective", objective, "--sharding", sharding,
        "--samples_per_prompt", str(K), "--micro_batch_groups", "1", "--updates_per_rollout", "2", "--learning_rate", "1e-3",
        "--dgpo_clip_range", "0.05", "--dgpo_kl_weight", "0.001",
        "--dgpo_old_ema", "0,0.5,0.5", "--nft_old_ema", "0,0.5,0.5", "--awm_old_ema", "0,0.5,0.5",
        "--grpo_clip_range", "0.2", *extra])


def grpo_trajectory(policy, cache, step: int) -> dict:
    """grpo's recorded SDE transitions for all GROUPS x K rows (every rank computes all, then takes its
    share): 2 trained steps from random states, x_{j+1} drawn from the REFERENCE's SDE step (the
    initial policy: LoRA B = 0), with its log-probs, so the first update's ratio is 1."""
    import torch

    import flow_grpo

    g = torch.Generator().manual_seed(2000 + step)
    sigmas, sigmas_next, sigma_max, a = torch.tensor([1.0, 0.75]), torch.tensor([0.75, 0.45]), 0.75, 0.7
    before = torch.randn(GROUPS * K, 2, 16, 64, generator=g)
    after, log_probs = torch.empty_like(before), torch.empty(GROUPS * K, 2)
    for group in range(GROUPS):  # one group per forward, as the update's micro-batches: the same numbers
        rows = slice(group * K, (group + 1) * K)
        conditioning = policy.conditioning(cache, [PROMPTS[group]] * K, "cpu")
        for j in range(2):
            v = policy.reference_velocity_at(before[rows, j], sigmas[j].expand(K), *conditioning)
            mean, step_std, _ = flow_grpo.sde_step_mean(before[rows, j], v, sigmas[j], sigmas_next[j], sigma_max, a)
            after[rows, j] = mean + step_std * torch.randn(mean.shape, generator=g)
            log_probs[rows, j] = flow_grpo.transition_log_prob(after[rows, j], mean, step_std)
    return {"before": before, "after": after, "log_probs": log_probs, "sigmas": sigmas, "sigmas_next": sigmas_next,
            "sigma_max": sigma_max, "steps": [0, 1], "noise_level": a}


def rollouts_for(step: int, rank: int, world: int, trajectory: dict | None = None):
    """This rank's share of the step's groups: the same global rollouts whatever the world size."""
    import torch

    from objectives import Rollouts

    g = torch.Generator().manual_seed(1000 + step)
    latents = torch.randn(GROUPS * K, 16, 64, generator=g)  # 64x64 images: 16 packed tokens
    rewards = torch.rand(GROUPS * K, generator=g, dtype=torch.float64)
    rewards[K:2 * K] = 0.5  # group 1 ties: dropped and counted
    mine = range(rank * GROUPS // world, (rank + 1) * GROUPS // world)
    rows = [g * K + j for g in mine for j in range(K)]
    mine_of = None
    if trajectory is not None:
        mine_of = {**trajectory, **{k: trajectory[k][rows] for k in ("before", "after", "log_probs")}}
    return Rollouts(latents=latents[rows], rewards=rewards[rows], group_ids=[f"{i // K}:p" for i in rows],
                    prompts=[PROMPTS[i // K] for i in rows], trajectory=mine_of)


def setup(objective_name: str, tiny_dir: str, sharding: str = "none", extra=()):
    """-> (objective, policy, prompt cache), the policy's LoRA initialised from the config's seed."""
    import torch

    import objectives
    import qwen_image as qi
    import distributed
    from policy import Policy

    config = config_for(objective_name, tiny_dir, sharding, extra)
    accelerator = distributed.make_accelerator(config)
    torch.manual_seed(config.seed)  # LoRA init
    pipe = qi.load_pipeline(tiny_dir, dtype=torch.float32, device=accelerator.device)
    cache = qi.PromptCache(pipe, config.max_sequence_length)
    cache.warm(PROMPTS)
    objective = objectives.build(config)
    return objective, Policy(config, pipe, accelerator, old_adapter=objective.uses_old_adapter), cache


def run(objective_name: str, tiny_dir: str, out: str, sharding: str = "none", extra=()) -> list[dict]:
    objective, policy, cache = setup(objective_name, tiny_dir, sharding, extra)
    accelerator = policy.accelerator
    logged = []
    for step in range(STEPS):
        trajectory = grpo_trajectory(policy, cache, step) if objective_name == "grpo" else None
        batch = rollouts_for(step, accelerator.process_index, accelerator.num_processes, trajectory)
        metrics, _ = objective.update(policy, batch, cache, step)
        logged.append(metrics)
    policy.save_final(os.path.join(out, objective_name))
    if accelerator.is_main_process:
        with open(os.path.join(out, objective_name, "metrics.json"), "w") as f:
            json.dump(logged, f)
    accelerator.wait_for_everyone()
    return logged


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)
    tiny_dir, out, *specs = sys.argv[1:]
    for spec in specs:
        sharding, name = spec.split(":")
        run(name, tiny_dir, os.path.join(out, sharding), sharding)
