"""Online Diffusion-DPO (and group-wise objectives) for Qwen-Image.

Each step, on every rank: take this rank's prompts -> roll out K images per prompt with the current
policy -> score them -> the objective's update (objectives.py). `dpo` (the default): pair best/worst
per prompt group -> shared noise and sigma per pair -> reference and policy velocity predictions ->
Diffusion-DPO loss -> update. `dgpo`, `nft`, `awm`: every sample, weighted by its reward advantage
within its group.

    python train_online_dpo.py --preset cpu_tiny --output_dir outputs/demo          # CPU, ~40 s
    python train_online_dpo.py --preset text_world --output_dir outputs/world       # text world, PP-OCR, minutes
    accelerate launch --config_file configs/multi_gpu.yaml train_online_dpo.py \\
        --train_data data/ocr/train.parquet --eval_data data/ocr/test.parquet --output_dir outputs/ocr

Every field of Config is a command-line flag; `--preset NAME` applies a group of overrides.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

import distributed
import dpo_watch
import evaluation
import perf
import prompt_data
import qwen_image as qi
import qwen_image_rollout as qir
import run_config
import run_lifecycle
import run_logs


@dataclass
class Config:
    # model
    pretrained: str = "Qwen/Qwen-Image"  # hub id, local save_pretrained dir, or "tiny" / "tiny-bench"
    dtype: str = "bfloat16"  # bfloat16, float16 or float32 for the frozen weights (trainable ones stay fp32)
    train_mode: str = "lora"  # "lora" (reference = adapters disabled) or "full" (reference = frozen copy)
    lora_rank: int = 64  # LoRA rank (>= 1)
    lora_alpha: int = 128  # LoRA alpha: the adapter's output is scaled by alpha / rank
    lora_targets: str = ",".join(qi.RECIPE_LORA_TARGETS)  # comma-separated module-name suffixes
    lora_init: str = "gaussian"  # gaussian or default (peft's kaiming A); inits that rewrite the base weights are refused
    gradient_checkpointing: bool = True  # recompute block activations in the backward: much less memory, ~+33 % update FLOPs
    sharding: str = "none"  # "none": accelerate decides (single / DDP); "fsdp2": fully_shard each block
    attention_backend: str = "native"  # diffusers dispatcher backend: native (torch SDPA), flash, _flash_3, sage, ...
    compile_transformer: bool = False  # torch.compile the repeated blocks (regional) for rollout and training
    compile_backend: str = "inductor"  # inductor, aot_eager (capture only, for tests) or eager
    # data
    train_data: str = "data/ocr/train.parquet"  # parquet / jsonl / txt, a directory of them, or a Hub dataset id
    split: str = "train"  # split of a Hub dataset id in train_data (eval_data: `owner/name:split`, default test)
    eval_data: str = "data/ocr/test.parquet"  # eval prompts, as train_data (a Hub id: owner/name:split, default split test)
    prompts_per_step: int = 32  # prompts per step over all ranks, divisible by the number of processes
    samples_per_prompt: int = 16  # K rollouts per prompt (all on one rank)
    # rollout
    height: int = 512  # image height in pixels, a multiple of 16
    width: int = 512  # image width in pixels, a multiple of 16
    num_inference_steps: int = 35  # sampling steps of a training rollout
    true_cfg_scale: float = 1.0  # CFG scale (1 = off); > 1 also applies CFG in the update's forwards
    negative_prompt: str = " "  # CFG's negative prompt (used when true_cfg_scale > 1)
    max_sequence_length: int = 256  # text tokens kept per prompt, 1-1024
    rollout_chunk_size: int = 16  # images per pipeline call
    rollout_cache: str = ""  # step cache for training rollouts only (never eval): "" off, first_block:THRESHOLD, taylorseer:INTERVAL[,WARMUP[,ORDER]]
    # reward
    reward: str = "ocr"  # ocr, ocr_vlm, ocr_server, jpeg_compressibility, brightness, pickscore or clipscore; or weighted: ocr:1.0,pickscore:0.2
    reward_kwargs: str = "{}"  # JSON for rewards.build_reward; keyed by component name for a weighted reward
    objective: str = "dpo"  # dpo (Diffusion-DPO on pairs), dgpo, nft (DiffusionNFT), awm or grpo (Flow-GRPO) (objectives.py)
    reward_overlap: bool = False  # score rollout chunk i on a worker thread while chunk i+1 is sampled
    # DPO
    beta: float = 100.0  # Diffusion-DPO's beta (> 0; docs/objectives.md, "Diffusion-DPO")
    pair_strategy: str = "best_worst"  # best_worst (best vs worst per group), top_bottom (floor(K/2) pairs per group) or all (every pair of a group, ties dropped)
    min_reward_margin: float = 0.0  # a pair needs chosen - rejected reward > this margin (>= 0)
    reverse_preference: bool = False  # control run: train towards the rejected sample
    sigma_scheme: str = ""  # "" = the objective's official: dpo logit_normal; dgpo sampler_first (distinct steps among the sampler's first, shared by the batch); nft sampler (the sampler's own sigmas); awm sampler_stratified; or logit_normal, uniform, mode (any), sampler, sampler_stratified (group objectives)
    logit_mean: float = 0.0  # mean of the logit-normal sigma distribution (logit_normal scheme)
    logit_std: float = 1.0  # std of the logit-normal sigma distribution (logit_normal scheme)
    updates_per_rollout: int = 1  # optimizer steps per rollout batch, fresh noise and sigma each
    train_timesteps: int = 0  # timesteps (noise, sigma draws) per trained sample or pair per optimizer step, gradients accumulated over them; 0 = the official: dpo 1 (Diffusion-DPO), dgpo 4 (num_train_timesteps), nft int(0.99 x num_inference_steps) (timestep_fraction), awm 6 (train_timesteps)
    update_split: str = ""  # "" = the objective's official; "all": each of the updates_per_rollout optimizer steps uses every sample (fresh noise / sigma); "disjoint": the rollout batch is split into updates_per_rollout disjoint parts, one optimizer step each (each sample used once, as the official Flow-GRPO / VeRL-Omni scripts)
    micro_batch_pairs: int = 1  # pairs per forward/backward; gradients accumulate over micro-batches
    # DPO's stabilising levers, all off by default (docs/objectives.md, "Keeping online DPO stable"); objective dpo only
    pair_weighting: str = "none"  # "none" or "margin": each pair's DPO loss weighted by its reward margin / the step's mean margin (GPO, arXiv 2505.11070)
    chosen_sft_weight: float = 0.0  # RPO (arXiv 2404.19733): adds this weight x the flow-matching loss of the chosen sample (>= 0; 0 = off)
    winner_preserving: bool = False  # Diffusion-SDPO (arXiv 2511.03317; official train.py --use_winner_preserving): scale the rejected sample's gradient so the chosen error does not rise, to first order
    winner_preserving_mu: float = 0.0  # Diffusion-SDPO's safety margin mu, in [0, 1] (official --winner_preserving_mu, default 0)
    ref_update_every: int = 0  # TR-DPO (arXiv 2404.09656): move the reference towards the policy every N optimizer steps (0 = frozen reference; LoRA only: the reference is then its own adapter)
    ref_update_alpha: float = 1.0  # TR-DPO's soft update ref <- alpha x policy + (1 - alpha) x ref, on the LoRA factors, in (0, 1] (1 = a hard copy, flow_grpo online DPO's ref_update_step)
    norm_guard_weight: float = 0.0  # adds this weight x relu(|v| / |v_ref| - 1 - norm_guard_tolerance)^2 per sample: stops the velocity norm inflating (NormGuard; 0 = off)
    norm_guard_tolerance: float = 0.05  # the velocity-norm inflation over the reference's the guard lets through for free (>= 0)
    # optimisation
    learning_rate: float = 3e-4  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW beta1, in [0, 1)
    adam_beta2: float = 0.999  # AdamW beta2, in [0, 1)
    adam_epsilon: float = 1e-8  # AdamW epsilon (> 0)
    max_grad_norm: float = 1.0  # gradients are clipped to this global norm
    lr_warmup_steps: int = 0  # linear LR warm-up over this many optimizer steps, then constant
    max_steps: int = 300  # training steps (one rollout batch each)
    max_nonfinite_in_a_row: int = 3  # stop after this many non-finite updates or rollouts (NaN / inf) in a row
    max_degenerate_steps_in_a_row: int = 10  # stop after this many steps in a row that train nothing (no pairs, all tied, non-finite); 0 = never
    # evaluation, logging, checkpoints
    eval_every: int = 20  # evaluate at step 0 and every N steps (0 = never)
    eval_samples_per_prompt: int = 1  # eval images per prompt (sample j of prompt i has seed i * 1000 + j)
    eval_inference_steps: int = 50  # sampling steps of an eval image
    max_eval_prompts: int = 0  # evaluate on the first N prompts of eval_data (0 = all)
    eval_with_ema: bool = False  # evaluate and export an EMA of the trained LoRA (a third adapter), as the official NFT / AWM / DGPO runs do (train.ema; stepped after every optimizer step as NFT's, where DGPO's steps every 8th and AWM's once per rollout batch)
    eval_ema_decay: float = 0.9  # that EMA's decay cap: min((1+k)/(10+k), cap) after optimizer step k (official NFT/DGPO EMAModuleWrapper decay 0.9; AWM 0.99)
    eval_baseline: str = ""  # a run folder whose step-0 eval (same model, eval settings) this run takes as its own
    checkpoint_every: int = 20  # checkpoint every N steps (0 = never; a stop signal always writes one)
    checkpoints_total_limit: int = 3  # keep the newest N checkpoints (0 = all)
    sample_grid_every: int = 20  # save a chosen-over-rejected grid to samples/ every N steps (0 = never)
    log_with: str = "wandb"  # wandb (offline without WANDB_API_KEY), tensorboard or none
    peak_tflops: float = 0.0  # the device's dense bf16 peak (docs/performance.md): logs perf/mfu; 0 = off
    tracker_project: str = "qwen-image-online-dpo"  # the wandb / tensorboard project name
    # sharing: lora/README.md (model card) is always written; the upload needs a token and network
    push_to_hub: bool = False  # upload output_dir/lora (weights, model card, eval grid) to the Hub at the end
    hub_model_id: str = ""  # the Hub repository, "user/name"; required by push_to_hub
    hub_token: str = ""  # default: $HF_TOKEN or the `hf auth login` token; never written to config.json
    output_dir: str = "outputs/online_dpo"  # the run folder (config.json, metrics.jsonl, checkpoints, lora/, samples/)
    resume_from_checkpoint: str = ""  # "", latest (the newest complete checkpoint in output_dir) or a checkpoint folder
    overwrite_output_dir: bool = False  # a fresh run into a folder holding a run: delete that run's files first
    seed: int = 0  # run seed: rollout, noise and data-order seeds derive from it
    preset: str = ""  # a named group of overrides, applied first (listed at the end of --help)
    # ---- group objectives (objectives.py; formulas in group_losses.py; defaults: the official OCR configs, DiffusionNFT config/nft.py sd3_ocr, AWM config/dgx_awm.py ocr_sd3_no_cfg_1node, DGPO config/dgpo.py, unless a comment says otherwise)
    advantage_std: str = "global"  # "global": (r - group mean) / (std of all the step's rewards + 1e-4) (official sample.global_std); "group": / the group's std
    drop_tied_groups: bool = False  # drop groups whose rewards are all equal (A = 0) before the update; official: trained (they count in the mean, carry the KL / old terms)
    micro_batch_groups: int = 1  # whole prompt groups (K samples each) per forward/backward (not an official knob)
    dgpo_beta: float = 100.0  # DGPO's DPO beta (official train.beta_dpo: 100)
    dgpo_kl_weight: float = 0.0  # weight of mean (v - v_ref)^2, relative to the official-scale policy term (official train.beta: OCR 0.02, README mode 1 1e-3; 0 here)
    dgpo_exact_gradient: bool = False  # use the -logsigmoid's own gradient, beta times the official surrogate's (then the KL weight counts 1/beta as much)
    dgpo_clip_range: float = 0.0  # > 0: PPO-style clip of each sample's error against the old (EMA) adapter (official clip_range with clip_dsm: OCR 1e-2; 0 here)
    dgpo_old_ema: str = "0,0.001,0.3"  # old adapter EMA "start,rate,max" of the optimizer-step count, stepped per optimizer step (official ema_ref: min(0.3, 0.001 * global_step))
    dgpo_switch_ema_ref: int = 200  # rollouts sampled with the old (EMA) adapter after this many optimizer steps, with or without the clip (official switch_ema_ref: 200, unconditional)
    dgpo_first_steps_fraction: float = 0.6  # sigma_scheme sampler_first draws among the sampler's first int(n x fraction) + 1 steps (official config/dgpo.py trunc_steps 6 of 10 steps)
    nft_beta: float = 0.1  # DiffusionNFT's beta: v+ = beta v + (1-beta) v_old (official config.beta, OCR: 0.1)
    nft_adv_clip: float = 5.0  # advantages clipped to +-c; r = A/(2c) + 1/2 (official train.adv_clip_max: 5)
    nft_kl_weight: float = 1e-4  # weight of mean (v - v_ref)^2 (official train.beta: 1e-4)
    nft_old_ema: str = "75,0.0075,0.999"  # old adapter EMA schedule of the optimizer-step count, stepped per rollout batch (official decay_type 2)
    awm_clip_range: float = 1.0  # PPO clip range of the likelihood ratio to the rollout policy (official train.clip_range: 1)
    awm_adv_clip: float = 5.0  # advantages clipped to +-c, then divided by c (official train.adv_clip_max: 5)
    awm_weighting: str = "ghuber"  # likelihood weighting: uniform (the plain flow-matching loss), t or ghuber (official config/dgx_awm.py OCR train.weighting ghuber, ghuber_power 0.25)
    awm_kl_weight: float = 0.003  # weight of mean (v - v_ref)^2 (official train.beta: 0.003)
    awm_old_kl_weight: float = 1.0  # weight of mean (v - v_old)^2 (official train.ema_beta: 1)
    awm_old_ema: str = "0,0.001,0.3"  # old adapter EMA schedule of the optimizer-step count, stepped per rollout batch (official kl_ema_decay_type linear, kl_ema_decay 0.3)
    # ---- Flow-GRPO (objective grpo; flow_grpo.py)
    grpo_noise_level: float = 0.7  # SDE noise level a, sigma_t = a sqrt(t/(1-t)) (official config/base.py sample.noise_level)
    grpo_sde_window: str = ""  # "": SDE on every step; "start,length": SDE on those steps, ODE elsewhere; "random:length": Flow-GRPO-Fast, a start drawn per step in 0 .. num_inference_steps // 2 - length (official train_sd3_fast.py; its SD3.5 configs: random:3 with grpo_timestep_fraction 1, grpo_noise_level 0.8, grpo_clip_range 1e-5, grpo_kl_weight 0)
    grpo_timestep_fraction: float = 0.99  # trains the first int(SDE steps x fraction) SDE steps (official config/grpo.py general_ocr_sd3 train.timestep_fraction)
    grpo_clip_range: float = 1e-4  # PPO clip range of the likelihood ratio (official config/base.py train.clip_range)
    grpo_adv_clip: float = 5.0  # advantages clipped to +-c (official config/base.py train.adv_clip_max)
    grpo_kl_weight: float = 0.04  # weight of the KL to the reference on the SDE step means (official config/grpo.py general_ocr_sd3 train.beta)
    grpo_keep_zero_advantage: bool = False  # train the samples whose advantage is exactly 0 too (only their KL acts); official: dropped before training (train_sd3.py)

PRESETS = {
    # The tiny random Qwen-Image on a CPU with a reward it can learn (run_config.CPU_TINY_OVERRIDES), 8 prompts
    # x 8 samples, 4 sampling steps, two updates per rollout batch.
    "cpu_tiny": dict(
        run_config.CPU_TINY_OVERRIDES, train_data=run_config.TINY_PROMPTS, prompts_per_step=8, samples_per_prompt=8,
        num_inference_steps=4, updates_per_rollout=2, micro_batch_pairs=8, micro_batch_groups=2, max_steps=20,
        eval_every=10, checkpoint_every=10, sample_grid_every=10,
    ),
    # Online DPO with the real PP-OCRv5 reward on the shipped text world (worlds/text_world, built by
    # build_text_world.py), 8 prompts x 8 samples, 8 sampling steps, 4 updates per rollout (the OCR
    # reward of 64 images costs ~6x an update here). The best DPO recipe found so far (beta, updates and lr swept):
    # the moving reference (TR-DPO: 60 % of the way to the policy every 40 optimizer steps, i.e. every 10 rollout
    # steps) took it from +0.028 +- 0.056 (a collapse on seed 4) to +0.101 +- 0.013 on seeds 0-4 (docs/objectives.md).
    # The group objectives take all 8 groups in one forward: the same loss, their update ~2x faster than 1 at a time;
    # the moving reference is DPO's alone (dpo_update.preset_levers_off).
    "text_world": dict(
        run_config.TEXT_WORLD_OVERRIDES, train_data=os.path.join(run_config.TEXT_WORLD_DATA, "train.txt"), prompts_per_step=8,
        samples_per_prompt=8, num_inference_steps=8, updates_per_rollout=4, micro_batch_pairs=16, micro_batch_groups=8,
        beta=100.0, pair_strategy="top_bottom", learning_rate=5e-4, lora_rank=32, lora_alpha=32, max_steps=60,
        eval_every=20, checkpoint_every=20, sample_grid_every=20, ref_update_every=40, ref_update_alpha=0.6,
    ),
}


def validate(config: Config, world_size: int = 1):
    """Every rule checked before any model loads; errors name the field."""
    from run_config import require
    from run_lifecycle import validate_policy_config
    from getting_started import ONLINE_TRY, missing_data_rule
    from dpo_update import validate_dpo_levers

    for field in ("train_data", "eval_data"):  # first: a run without data says what to run instead
        path = getattr(config, field)
        require(run_config.data_source_exists(path), field,
                missing_data_rule(path, "train_online_dpo.py", "--train_data, --eval_data", ONLINE_TRY))
    validate_policy_config(config, world_size)
    perf.validate_config(config, require)
    require(config.samples_per_prompt >= 2, "samples_per_prompt", "need at least 2 samples per prompt to make a pair")
    require(config.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
    require(config.prompts_per_step % world_size == 0, "prompts_per_step",
            f"must be divisible by the number of processes ({world_size}): all K samples of a prompt stay on one rank")
    require(config.num_inference_steps >= 1, "num_inference_steps", "must be >= 1")
    require(config.rollout_chunk_size >= 1, "rollout_chunk_size", "must be >= 1")
    try:
        qir.parse_rollout_cache(config.rollout_cache)
    except ValueError as error:
        require(False, "rollout_cache", str(error))
    require(not (config.rollout_cache and config.compile_transformer), "rollout_cache",
            "not supported with compile_transformer yet (the cache swaps the blocks' forward on every rollout)")
    require(not (config.rollout_cache and config.sharding == "fsdp2"), "rollout_cache",
            "not supported with sharding=fsdp2 yet (untested)")
    require(config.updates_per_rollout >= 1, "updates_per_rollout", "must be >= 1")
    require(config.update_split in ("", "all", "disjoint"), "update_split", "must be '', 'all' or 'disjoint'")
    require(config.sample_grid_every >= 0, "sample_grid_every", "must be >= 0 (0 disables)")
    require(config.max_degenerate_steps_in_a_row >= 0, "max_degenerate_steps_in_a_row", "must be >= 0 (0: never stop)")
    validate_objective(config)
    validate_dpo_levers(config)  # dpo_update.py: DPO's stabilising levers
    run_config.require_data_source(config.train_data, "train_data")


def validate_objective(config: Config):
    """The objective and every objective's knobs (all checked, so a typo never waits for a switch)."""
    from group_losses import AWM_WEIGHTINGS
    from objectives import OBJECTIVES, build, parse_ema
    from run_config import require

    require(config.objective in OBJECTIVES, "objective", f"must be one of {', '.join(OBJECTIVES)}")
    require(config.advantage_std in ("global", "group"), "advantage_std", "must be 'global' or 'group'")
    require(config.objective != "dpo" or config.sigma_scheme not in ("sampler", "sampler_stratified"), "sigma_scheme",
            "sampler and sampler_stratified are the group objectives' schemes; dpo takes logit_normal, uniform or mode")
    require(config.dgpo_switch_ema_ref >= 0, "dgpo_switch_ema_ref", "must be >= 0")
    require(config.train_timesteps >= 0, "train_timesteps", "must be >= 0 (0: the objective's official)")
    require(0 < config.dgpo_first_steps_fraction <= 1, "dgpo_first_steps_fraction", "must be in (0, 1]")
    require(math.isfinite(config.eval_ema_decay) and 0 <= config.eval_ema_decay < 1, "eval_ema_decay", "must be in [0, 1)")
    require(not config.eval_with_ema or config.train_mode == "lora", "train_mode",
            "must be 'lora' with eval_with_ema: the EMA is a LoRA adapter")
    require(config.micro_batch_groups >= 1, "micro_batch_groups", "must be >= 1: a micro-batch holds whole groups")
    for field in ("dgpo_beta", "nft_beta", "nft_adv_clip", "awm_clip_range", "awm_adv_clip"):
        value = getattr(config, field)
        require(math.isfinite(value) and value > 0, field, "must be a finite number > 0")
    for field in ("dgpo_kl_weight", "dgpo_clip_range", "nft_kl_weight", "awm_kl_weight", "awm_old_kl_weight"):
        value = getattr(config, field)
        require(math.isfinite(value) and value >= 0, field, "must be a finite number >= 0")
    require(config.awm_weighting in AWM_WEIGHTINGS, "awm_weighting", f"must be one of {', '.join(AWM_WEIGHTINGS)}")
    for field in ("dgpo_old_ema", "nft_old_ema", "awm_old_ema"):
        try:
            start, rate, top = parse_ema(getattr(config, field))
            ok = all(math.isfinite(x) for x in (start, rate, top)) and start >= 0 and rate >= 0 and 0 <= top < 1
        except ValueError:
            ok = False
        require(ok, field, "must be 'start,rate,max' with start >= 0, rate >= 0 and 0 <= max < 1")
    validate_grpo(config)
    if config.objective in OBJECTIVES:
        require(not build(config).uses_old_adapter or config.train_mode == "lora", "train_mode",
                f"must be 'lora' with objective {config.objective!r}: its old policy is a second LoRA adapter")


def objective_knobs(config: Config) -> tuple[str, ...]:
    """The objective's own knobs (objectives.OBJECTIVES[name].knobs): weight-defining on resume, with
    checkpoints.WEIGHT_DEFINING_FIELDS (the shared run code does not know the objectives)."""
    from objectives import OBJECTIVES

    objective = OBJECTIVES.get(config.objective)
    return objective.knobs if objective else ()


def validate_grpo(config: Config):
    """Flow-GRPO's knobs (checked whatever the objective, like the others')."""
    import flow_grpo
    from run_config import require

    for field in ("grpo_noise_level", "grpo_clip_range", "grpo_adv_clip"):
        value = getattr(config, field)
        require(math.isfinite(value) and value > 0, field, "must be a finite number > 0")
    require(math.isfinite(config.grpo_kl_weight) and config.grpo_kl_weight >= 0, "grpo_kl_weight",
            "must be a finite number >= 0")
    require(0 < config.grpo_timestep_fraction <= 1, "grpo_timestep_fraction", "must be in (0, 1]")
    require(not (config.objective == "grpo" and config.rollout_cache), "rollout_cache",
            "must be '' with objective grpo: its likelihood ratios need the exact sampler of its recorded steps")
    try:
        window = flow_grpo.resolve_window(config.grpo_sde_window, config.num_inference_steps, config.seed)
        flow_grpo.sde_steps(config.num_inference_steps, window, config.grpo_timestep_fraction)
    except ValueError as error:
        field = "grpo_sde_window" if "window" in str(error) else "grpo_timestep_fraction"
        require(False, field, str(error))


def main(argv=None):
    import run_config
    from dpo_update import preset_levers_off

    config = run_config.parse_config(Config, PRESETS, argv)
    preset_levers_off(config, run_config.LAST_ARGV)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(config, world_size)
    with run_lifecycle.checkpoint_when_abandoned():  # a stop signal during a rollout / reward: the last step's checkpoint
        return train(config)


def train(config: Config):
    # Imports after validation: a bad flag fails in a second, not after ~10 s of imports.
    from tqdm.auto import tqdm

    import objectives
    from policy import Policy
    from rewards import build_reward, uses_ocr_target

    accelerator, stop = run_lifecycle.launch(config, validate, knobs=objective_knobs(config))
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    is_ocr = uses_ocr_target(config.reward)  # prompts need a quoted OCR target

    # ---- data, reward, model
    t0 = time.perf_counter()
    train_rows = prompt_data.load_prompts(config.train_data, need_ocr_target=is_ocr, split=config.split)
    eval_rows = prompt_data.load_prompts(config.eval_data, need_ocr_target=is_ocr, split="test",
                                         max_rows=config.max_eval_prompts)
    reward_fn = build_reward(config.reward, **json.loads(config.reward_kwargs))
    t1 = time.perf_counter()
    pipe = qi.load_pipeline(config.pretrained, dtype=getattr(torch, config.dtype), device=device)
    t2 = time.perf_counter()
    prompt_cache = qi.PromptCache(pipe, config.max_sequence_length)
    # every prompt this run will see is encoded once; then the text encoder leaves the accelerator
    prompt_cache.warm([r["prompt"] for r in train_rows + eval_rows] + [config.negative_prompt],
                      rank=rank, world_size=world)  # each rank encodes its share, then they share
    prompt_cache.offload_text_encoder("cpu")
    accelerator.print(f"loaded {len(train_rows)} train / {len(eval_rows)} eval prompts and reward {config.reward} "
                      f"in {t1 - t0:.1f} s; pipeline {config.pretrained} ({config.dtype}) on {device} in {t2 - t1:.1f} s; "
                      f"{len(prompt_cache.embeds)} prompts encoded in {time.perf_counter() - t2:.1f} s")
    objective = objectives.build(config)  # what an update does with the rollouts
    # LoRA (or full) + reference (+ the old adapter when the objective has one) + optimizer
    policy = Policy(config, pipe, accelerator, old_adapter=objective.uses_old_adapter)
    transformer = pipe.transformer  # the policy samples with the same (possibly sharded) module
    perf.set_attention_backend(transformer, config.attention_backend)
    if config.compile_transformer:  # after LoRA, before the first forward
        perf.compile_transformer_blocks(transformer, config.compile_backend)
    compile_counter = perf.CompileCounter()

    start_step, metrics_log = run_lifecycle.resume_and_start_run(config, policy, accelerator)

    # the training rollout's settings: the step cache applies here only (the eval uses eval_inference_steps, no cache)
    rollout_settings = evaluation.rollout_settings(config, config.num_inference_steps, cache=config.rollout_cache)
    run_eval = evaluation.make_eval(config, pipe, prompt_cache, eval_rows, reward_fn, accelerator, metrics_log)
    if config.eval_with_ema:  # the eval samples with the EMA adapter (rollouts keep the trained / old one)
        eval_trained = run_eval

        def run_eval(step):
            with policy.sampling_with_ema():
                return eval_trained(step)

    # dpo: one warning line when the run shows the collapse pattern (dpo_watch.py), naming its best checkpoint
    watch = dpo_watch.CollapseWatch(config.output_dir, run_logs.eval_history(config.output_dir) if start_step else [])
    if config.objective == "dpo":
        eval_unwatched = run_eval

        def run_eval(step):
            metrics = eval_unwatched(step)
            watch.add(metrics, step)
            return metrics

    if start_step == 0 and config.eval_every:
        run_eval(0)
    progress = tqdm(range(start_step, config.max_steps), initial=start_step, total=config.max_steps,
                    disable=not accelerator.is_local_main_process, desc=f"online {config.objective}")
    K = config.samples_per_prompt
    for step in range(start_step, config.max_steps):
        # 1-3. this rank's prompts; K rollouts each with the current policy, seeds = f(seed, step, rank, j)
        stop.abandonable(step)  # a stop signal from here to the update abandons this step (a hung reward server)
        t0 = time.perf_counter()
        rows = prompt_data.prompts_for_step(train_rows, step, config.prompts_per_step, rank, world, config.seed)
        flat_rows = [row for row in rows for _ in range(K)]
        prompts = [row["prompt"] for row in flat_rows]
        # a group's id: its position in the step's global prompt list (unique over ranks) and its row
        group_ids = [f"{rank * len(rows) + i}:{row['uid']}" for i, row in enumerate(rows) for _ in range(K)]
        seeds = prompt_data.rollout_seeds(config.seed, step, rank, len(prompts))
        transformer.eval()
        block_forwards = [] if config.rollout_cache else None  # under a step cache: the block forwards that ran
        recorder = objective.recorder(step) if hasattr(objective, "recorder") else None  # grpo: the SDE sampler
        scheduler_step = recorder.chunk_step if recorder else None
        # NFT samples with its old adapter (the paper's behaviour policy), DGPO with it after dgpo_switch_ema_ref
        # optimizer steps (when it has one); the other objectives with the trained one
        with policy.sampling_with_old() if objective.samples_with_old(policy.optimizer_steps) else contextlib.nullcontext():
            if config.reward_overlap:  # 4. rewards, chunk by chunk while the next chunk is sampled
                reward_parts = {}

                def score_chunk(chunk_images, start):
                    combined, parts = evaluation.score_rows_with_components(reward_fn, chunk_images,
                                                                            flat_rows[start:start + len(chunk_images)])
                    for name, scores in parts.items():  # one worker thread: chunks arrive in order
                        reward_parts.setdefault(name, []).extend(scores)
                    return combined
                with perf.OverlappedScorer(score_chunk) as scorer:
                    latents, images = qir.rollout(pipe, prompt_cache, prompts, seeds, rollout_settings, on_chunk=scorer,
                                                 block_forwards=block_forwards, scheduler_step=scheduler_step)
                    t1 = time.perf_counter()
                    combined = scorer.results()
            else:
                latents, images = qir.rollout(pipe, prompt_cache, prompts, seeds, rollout_settings,  # [N, S, 64]
                                             block_forwards=block_forwards, scheduler_step=scheduler_step)
                t1 = time.perf_counter()
                # 4. rewards
                # parts: the components of a multi-reward
                combined, reward_parts = evaluation.score_rows_with_components(reward_fn, images, flat_rows)
        transformer.train()
        rewards = torch.tensor(combined, dtype=torch.float64)  # pairs are selected on the combined value
        t2 = time.perf_counter()

        # 5-7. the objective's update: pairs (dpo) or group advantages (dgpo, nft, awm), noise and sigma,
        # reference / old / policy predictions, loss, backward, optimizer step(s). Not on NaN / inf
        # rollouts or rewards (every rank agrees); a step without an optimizer step is counted.
        steps_before, metrics, shown_pairs = policy.optimizer_steps, {}, torch.zeros(0, 2, dtype=torch.long)
        stop.not_abandonable()  # from here a stop signal lets the step finish, then after_step checkpoints
        if policy.check_rollouts(latents, rewards, step, metrics):
            batch = objectives.Rollouts(latents=latents, rewards=rewards, group_ids=group_ids, prompts=prompts,
                                        trajectory=recorder.result() if recorder else None)
            metrics, shown_pairs = objective.update(policy, batch, prompt_cache, step)
        policy.note_step(steps_before, metrics)
        t3 = time.perf_counter()

        # 8. metrics, samples, evaluation, checkpoints
        all_rewards = accelerator.gather(rewards.to(device)).cpu() if world > 1 else rewards
        metrics.update({
            "data/prompt_uids": [u for uids in distributed.gather_object(accelerator, [r["uid"] for r in rows])
                                 for u in uids],
            "reward/mean": all_rewards.mean().item(), "reward/std": all_rewards.std(unbiased=False).item(),
            "reward/max": all_rewards.max().item(), "reward/min": all_rewards.min().item(),
            "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": t3 - t2,
            "lr": policy.lr_scheduler.get_last_lr()[0],
        })
        metrics.update(evaluation.component_metrics(accelerator, reward_parts))  # reward/<name>/mean etc.
        # perf/*: the rollout's FLOPs and the update's as the objective counted them (perf.py)
        metrics.update(perf.step_metrics(config, transformer.config, prompt_cache, prompts,
                                         metrics.get("perf/update_tflop", 0.0), t1 - t0, t3 - t2, t3 - t0,
                                         block_forwards=block_forwards))
        if config.compile_transformer:  # compiles during this step (and the eval before it); 0 after warm-up
            metrics["compile/new_graphs"] = compile_counter.new()
            if step > start_step + 1 and metrics["compile/new_graphs"]:
                accelerator.print(f"step {step}: torch.compile compiled {metrics['compile/new_graphs']} new graph(s) "
                                  "after warm-up (a shape or mode changed)")
        if accelerator.is_main_process and config.sample_grid_every and (step + 1) % config.sample_grid_every == 0 and len(shown_pairs):
            shown = shown_pairs[:8]  # dpo: its pairs; group objectives: best over worst of each group
            grid = run_logs.pair_grid([images[c] for c in shown[:, 0]], [images[r] for r in shown[:, 1]],
                                      rewards[shown[:, 0]].tolist(), rewards[shown[:, 1]].tolist())
            run_logs.save_image(grid, os.path.join(config.output_dir, "samples", f"pairs-{step + 1:06d}.png"), "sample grid")
            metrics_log.log_image("train/pairs", grid, step + 1, caption="chosen (top) vs rejected (bottom), rank 0")
        metrics_log.log(metrics, step + 1)
        watch.add(metrics, step + 1)
        policy.stop_if_degenerate(step)  # non-finite rollouts or nothing trained too often in a row: raise
        progress.update(1)
        loss_key, acc_key = f"{objective.name}/loss", f"{objective.name}/implicit_acc"
        progress.set_postfix(loss=f"{metrics[loss_key]:.4f}" if loss_key in metrics else "skip",
                             reward=f"{metrics['reward/mean']:.4f}",
                             acc=f"{metrics[acc_key]:.2f}" if acc_key in metrics else "-")
        if run_lifecycle.after_step(step + 1, config, policy, accelerator, stop, run_eval):  # eval, checkpoint, SIGTERM
            return {"stopped_at": step + 1}
        warning = watch.check() if config.objective == "dpo" else None  # after the step's checkpoint is written
        if warning:
            accelerator.print(warning)
    progress.close()
    return run_lifecycle.finish(config, policy, metrics_log, accelerator)


if __name__ == "__main__":
    try:
        run_config.cli(main)  # a config or data error: one line on stderr, exit status 2
    except FloatingPointError as error:  # non-finite values or nothing trained (policy.TrainingStopped): exit 3
        print(f"{os.path.basename(sys.argv[0])}: stopped: {error}", file=sys.stderr)
        sys.exit(3)
