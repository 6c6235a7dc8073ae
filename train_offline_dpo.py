"""Offline Diffusion-DPO for Qwen-Image on a dataset of preference pairs.

Once: read the pairs (pairs_format.py), take each pair's latents from the file or
VAE-encode its images (resized and centre-cropped to the training resolution), encode every prompt.
Then each step, on every rank: this rank's pairs -> shared noise and sigma per pair -> reference and
policy velocity predictions -> the same Diffusion-DPO loss and update as the online trainer.

    python data_process/make_offline_pairs.py --preset cpu_tiny --output outputs/pairs/tiny.parquet
    python train_offline_dpo.py --preset cpu_tiny --pairs_path outputs/pairs/tiny.parquet --output_dir outputs/offline
    accelerate launch --config_file configs/multi_gpu.yaml train_offline_dpo.py --pairs_path data/pairs/ \\
        --eval_data data/ocr/test.parquet --output_dir outputs/offline_dpo
"""

from __future__ import annotations

import io
import json
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

import distributed
import evaluation
import flop_formula
import perf
import prompt_data
import qwen_image as qi
import run_config
import run_lifecycle
from getting_started import TEXT_WORLD_PAIRS


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
    attention_backend: str = "native"  # diffusers dispatcher backend (see the online trainer)
    compile_transformer: bool = False  # torch.compile the repeated blocks for the training forward
    compile_backend: str = "inductor"  # inductor, aot_eager (capture only, for tests) or eager
    # data
    pairs_path: str = "data/pairs/pairs.parquet"  # a pairs parquet, a directory of them, or a Hub dataset id (pairs or Pick-a-Pic columns)
    split: str = "train"  # split of a Hub dataset id in pairs_path (streamed)
    max_pairs: int = 0  # read only the first N usable pairs (0 = all): Hub sets too big to hold
    strict: bool = False  # corrupt image bytes: error instead of skipping the row
    eval_data: str = "data/ocr/test.parquet"  # eval prompts: parquet / jsonl / txt, a directory of them, or a Hub id (owner/name:split)
    height: int = 512  # training resolution: images are resized / centre-cropped to it
    width: int = 512  # training width in pixels, a multiple of 16
    max_sequence_length: int = 256  # text tokens kept per prompt, 1-1024
    pairs_per_step: int = 32  # pairs per step over all ranks, divisible by the number of processes
    # DPO
    beta: float = 2000.0  # Diffusion-DPO's beta (> 0); the generic offline default in this convention (docs/objectives.md, "Diffusion-DPO")
    reverse_preference: bool = False  # control run: train towards the rejected image
    sigma_scheme: str = "logit_normal"  # how a pair's sigma is drawn: logit_normal, uniform or mode (pairing.py)
    logit_mean: float = 0.0  # mean of the logit-normal sigma distribution
    logit_std: float = 1.0  # std of the logit-normal sigma distribution
    micro_batch_pairs: int = 1  # pairs per forward/backward; gradients accumulate over micro-batches
    # DPO's stabilising levers, all off by default (docs/objectives.md, "Keeping online DPO stable")
    chosen_sft_weight: float = 0.0  # RPO (arXiv 2404.19733): adds this weight x the flow-matching loss of the chosen sample (>= 0; 0 = off)
    winner_preserving: bool = False  # Diffusion-SDPO (arXiv 2511.03317; official train.py --use_winner_preserving): scale the rejected sample's gradient so the chosen error does not rise, to first order
    winner_preserving_mu: float = 0.0  # Diffusion-SDPO's safety margin mu, in [0, 1] (official --winner_preserving_mu, default 0)
    ref_update_every: int = 0  # TR-DPO (arXiv 2404.09656): move the reference towards the policy every N optimizer steps (0 = frozen reference; LoRA only: the reference is then its own adapter)
    ref_update_alpha: float = 1.0  # TR-DPO's soft update ref <- alpha x policy + (1 - alpha) x ref, on the LoRA factors, in (0, 1] (1 = a hard copy)
    norm_guard_weight: float = 0.0  # adds this weight x relu(|v| / |v_ref| - 1 - norm_guard_tolerance)^2 per sample: stops the velocity norm inflating (NormGuard; 0 = off)
    norm_guard_tolerance: float = 0.05  # the velocity-norm inflation over the reference's the guard lets through for free (>= 0)
    # optimisation
    learning_rate: float = 1e-4  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    adam_beta1: float = 0.9  # AdamW beta1, in [0, 1)
    adam_beta2: float = 0.999  # AdamW beta2, in [0, 1)
    adam_epsilon: float = 1e-8  # AdamW epsilon (> 0)
    max_grad_norm: float = 1.0  # gradients are clipped to this global norm
    lr_warmup_steps: int = 0  # linear LR warm-up over this many optimizer steps, then constant
    max_steps: int = 2000  # training steps
    max_nonfinite_in_a_row: int = 3  # stop after N skipped updates in a row (non-finite loss or gradient)
    # evaluation (rollouts of the eval prompts, scored by `reward`), logging, checkpoints
    reward: str = "ocr"  # ocr, ocr_vlm, ocr_server, jpeg_compressibility, brightness, pickscore or clipscore; or weighted: ocr:1.0,pickscore:0.2
    reward_kwargs: str = "{}"  # JSON for rewards.build_reward; keyed by component name for a weighted reward
    eval_every: int = 100  # evaluate at step 0 and every N steps (0 = never)
    eval_samples_per_prompt: int = 1  # eval images per prompt (sample j of prompt i has seed i * 1000 + j)
    eval_inference_steps: int = 50  # sampling steps of an eval image
    max_eval_prompts: int = 64  # evaluate on the first N prompts of eval_data (0 = all)
    eval_baseline: str = ""  # a run folder whose step-0 eval (same model, eval settings) this run takes as its own
    true_cfg_scale: float = 1.0  # CFG scale of the eval (1 = off); > 1 also applies CFG in the update's forwards
    negative_prompt: str = " "  # CFG's negative prompt (used when true_cfg_scale > 1)
    rollout_chunk_size: int = 16  # eval images per pipeline call
    checkpoint_every: int = 100  # checkpoint every N steps (0 = never; a stop signal always writes one)
    checkpoints_total_limit: int = 3  # keep the newest N checkpoints (0 = all)
    log_with: str = "wandb"  # wandb (offline without WANDB_API_KEY), tensorboard or none
    peak_tflops: float = 0.0  # the device's dense bf16 peak: logs perf/mfu; 0 = off
    tracker_project: str = "qwen-image-offline-dpo"  # the wandb / tensorboard project name
    # sharing: lora/README.md (model card) is always written; the upload needs a token and network
    push_to_hub: bool = False  # upload output_dir/lora (weights, model card, eval grid) to the Hub at the end
    hub_model_id: str = ""  # the Hub repository, "user/name"; required by push_to_hub
    hub_token: str = ""  # default: $HF_TOKEN or the `hf auth login` token; never written to config.json
    output_dir: str = "outputs/offline_dpo"  # the run folder (config.json, metrics.jsonl, checkpoints, lora/, samples/)
    resume_from_checkpoint: str = ""  # "", latest (the newest complete checkpoint in output_dir) or a checkpoint folder
    overwrite_output_dir: bool = False  # a fresh run into a folder holding a run: delete that run's files first
    seed: int = 0  # run seed: the noise, sigma and pair-order seeds derive from it
    preset: str = ""  # a named group of overrides, applied first (listed at the end of --help)


PRESETS = {
    # Pairs from data_process/make_offline_pairs.py --preset text_world (PP-OCRv5 on the text world).
    "text_world": dict(
        run_config.TEXT_WORLD_OVERRIDES, pairs_path=TEXT_WORLD_PAIRS, pairs_per_step=16,
        micro_batch_pairs=16, beta=100.0, learning_rate=5e-4, lora_rank=32, lora_alpha=32, max_steps=120,
        eval_every=40, max_eval_prompts=0, checkpoint_every=40,
    ),
    # Pairs from data_process/make_offline_pairs.py --preset cpu_tiny (brightness), the tiny model.
    "cpu_tiny": dict(
        run_config.CPU_TINY_OVERRIDES, pairs_per_step=16, micro_batch_pairs=16, beta=100.0, max_steps=30, eval_every=15,
        max_eval_prompts=0, checkpoint_every=15,
    ),
}


def validate(config: Config, world_size: int = 1):
    from run_config import require
    from run_lifecycle import validate_policy_config
    from getting_started import OFFLINE_TRY, missing_data_rule
    from dpo_update import validate_dpo_levers

    for field in ("pairs_path", "eval_data"):  # first: a run without data says what to run instead
        path = getattr(config, field)
        require(run_config.data_source_exists(path), field,
                missing_data_rule(path, "train_offline_dpo.py", "--pairs_path, --eval_data", OFFLINE_TRY))
    validate_policy_config(config, world_size)
    perf.validate_config(config, require)
    require(config.max_pairs >= 0, "max_pairs", "must be >= 0 (0 = all)")
    require(config.pairs_per_step >= 1 and config.pairs_per_step % world_size == 0, "pairs_per_step",
            f"must be >= 1 and divisible by the number of processes ({world_size})")
    validate_dpo_levers(config)  # dpo_update.py: DPO's stabilising levers


def main(argv=None):
    from run_config import parse_config

    config = parse_config(Config, PRESETS, argv)
    validate(config, int(os.environ.get("WORLD_SIZE", "1")))
    with run_lifecycle.checkpoint_when_abandoned():  # a stop signal during an eval: the last step's checkpoint
        return train(config)


def load_pair_latents(pipe, pairs: list[dict], height: int, width: int, batch_size: int = 16) -> int:
    """Adds `latents` [2, S, 64] (chosen, rejected) to every pair: from the file when it holds latents
    for this resolution, else VAE-encoded from the images (once). Returns how many were encoded."""
    from PIL import Image

    todo = []
    for pair in pairs:
        if "chosen_latents" in pair and (pair["height"], pair["width"]) == (height, width):
            pair["latents"] = torch.tensor(np.stack([pair["chosen_latents"], pair["rejected_latents"]]))
        else:
            todo.append(pair)
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        images = [Image.open(io.BytesIO(p[side])).convert("RGB") for p in chunk for side in ("chosen_image", "rejected_image")]
        latents = qi.encode_images(pipe, images, height, width, batch_size=2 * len(chunk))  # [2n, S, 64]
        for i, pair in enumerate(chunk):
            pair["latents"] = latents[2 * i:2 * i + 2]
    return len(todo)


def train(config: Config):
    from tqdm.auto import tqdm

    from dpo_update import dpo_update
    from pairs_format import read_pairs
    from policy import Policy
    from rewards import build_reward, uses_ocr_target

    accelerator, stop = run_lifecycle.launch(config, validate)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    is_ocr = uses_ocr_target(config.reward)  # prompts need a quoted OCR target

    # ---- data, reward, model; latents and prompt embeddings computed once
    t0 = time.perf_counter()
    pairs, counts = read_pairs(config.pairs_path, strict=config.strict, split=config.split, max_pairs=config.max_pairs)
    accelerator.print(f"read {len(pairs)} pairs from {config.pairs_path} in {time.perf_counter() - t0:.1f} s "
                      f"(skipped: {counts['corrupt_images_skipped']} undecodable, {counts.get('ties_dropped', 0)} Pick-a-Pic "
                      f"ties, {counts.get('bad_label_dropped', 0)} bad labels)")
    eval_rows = prompt_data.load_prompts(config.eval_data, need_ocr_target=is_ocr, split="test",
                                         max_rows=config.max_eval_prompts)
    reward_fn = build_reward(config.reward, **json.loads(config.reward_kwargs))
    t0 = time.perf_counter()
    pipe = qi.load_pipeline(config.pretrained, dtype=getattr(torch, config.dtype), device=device)
    accelerator.print(f"pipeline {config.pretrained} ({config.dtype}) on {device} loaded in {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    encoded = load_pair_latents(pipe, pairs, config.height, config.width)
    prompt_cache = qi.PromptCache(pipe, config.max_sequence_length)
    prompt_cache.warm([p["prompt"] for p in pairs] + [r["prompt"] for r in eval_rows] + [config.negative_prompt],
                      rank=rank, world_size=world)  # each rank encodes its share, then they share
    prompt_cache.offload_text_encoder("cpu")
    n_prompts = len({p["prompt"] for p in pairs} | {r["prompt"] for r in eval_rows})  # the negative prompt is not one
    accelerator.print(f"{len(pairs)} pairs ({encoded} VAE-encoded, {len(pairs) - encoded} from stored latents) "
                      f"and {n_prompts} prompts prepared in {time.perf_counter() - t0:.1f} s")
    policy = Policy(config, pipe, accelerator)
    perf.set_attention_backend(pipe.transformer, config.attention_backend)
    if config.compile_transformer:
        perf.compile_transformer_blocks(pipe.transformer, config.compile_backend)

    start_step, metrics_log = run_lifecycle.resume_and_start_run(config, policy, accelerator)
    run_eval = evaluation.make_eval(config, pipe, prompt_cache, eval_rows, reward_fn, accelerator, metrics_log)

    if start_step == 0 and config.eval_every:
        run_eval(0)
    progress = tqdm(range(start_step, config.max_steps), initial=start_step, total=config.max_steps,
                    disable=not accelerator.is_local_main_process, desc="offline DPO")
    for step in range(start_step, config.max_steps):
        stop.not_abandonable()  # an offline step calls no reward: a signal lets it finish (only evals are abandoned)
        t0 = time.perf_counter()
        # this rank's pairs: seeded per-epoch permutations, a pure function of the step
        batch = prompt_data.prompts_for_step(pairs, step, config.pairs_per_step, rank, world, config.seed)
        chosen_rejected_latents = torch.cat([p["latents"] for p in batch]).to(device)  # [2P, S, 64]
        if config.reverse_preference:
            chosen_rejected_latents = chosen_rejected_latents.view(len(batch), 2, *chosen_rejected_latents.shape[1:])
            chosen_rejected_latents = chosen_rejected_latents.flip(1).flatten(0, 1)
        pair_prompts = [p["prompt"] for p in batch for _ in range(2)]
        metrics = dpo_update(policy, chosen_rejected_latents, pair_prompts, len(batch), prompt_cache, step)
        score_gap = sum(p["chosen_score"] - p["rejected_score"] for p in batch)
        update_s = time.perf_counter() - t0
        update_flops = perf.update_step_flops(
            pipe.transformer.config, flop_formula.image_tokens_for(config.height, config.width),
            perf.text_lengths(prompt_cache, pair_prompts), config.micro_batch_pairs, 1, config.train_mode,
            config.lora_rank, tuple(config.lora_targets.split(",")), config.gradient_checkpointing,
            perf.text_lengths(prompt_cache, [config.negative_prompt])[0] if config.true_cfg_scale > 1 else None)
        achieved = flop_formula.throughput(update_flops, update_s, config.peak_tflops)
        metrics.update({"perf/update_tflop": update_flops / 1e12, "perf/update_tflops_per_s": achieved["tflops_per_device"]})
        if "mfu" in achieved:
            metrics["perf/mfu"] = achieved["mfu"]
        metrics.update({"pairs/score_gap": distributed.all_sum(accelerator, score_gap)[0] / config.pairs_per_step,
                        "time/update_s": update_s, "lr": policy.lr_scheduler.get_last_lr()[0],
                        "data/epoch": step * config.pairs_per_step / len(pairs)})
        metrics_log.log(metrics, step + 1)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics.get('dpo/loss', float('nan')):.4f}",
                             gap=f"{metrics['pairs/score_gap']:.3f}",
                             acc=f"{metrics.get('dpo/implicit_acc', float('nan')):.2f}")
        if run_lifecycle.after_step(step + 1, config, policy, accelerator, stop, run_eval):  # eval, checkpoint, SIGTERM
            return {"stopped_at": step + 1}
    progress.close()
    return run_lifecycle.finish(config, policy, metrics_log, accelerator)


if __name__ == "__main__":
    from pairs_format import PairsDataError

    run_config.cli(main, input_errors=(PairsDataError,))  # a config or data error: one line on stderr, exit status 2
