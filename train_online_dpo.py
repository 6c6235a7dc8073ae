"""Online Diffusion-DPO for Qwen-Image.

Each step, on every rank: take this rank's prompts -> roll out K images per prompt with the current
policy -> score them -> pair best/worst per prompt group -> shared noise and sigma per pair ->
reference and policy velocity predictions -> Diffusion-DPO loss -> update.

    python train_online_dpo.py --preset cpu_tiny --output_dir outputs/demo          # CPU, minutes
    accelerate launch --config_file configs/ddp_8gpu.yaml train_online_dpo.py \\
        --train_data data/ocr/train.parquet --eval_data data/ocr/test.parquet --output_dir outputs/ocr

Every field of Config is a command-line flag; `--preset NAME` applies a group of overrides.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import torch


@dataclass
class Config:
    # model
    pretrained: str = "Qwen/Qwen-Image"  # hub id, local save_pretrained dir, or "tiny" / "tiny-bench"
    dtype: str = "bfloat16"  # weights of the frozen parts; trainable parameters are kept in fp32
    train_mode: str = "lora"  # "lora" (reference = adapters disabled) or "full" (reference = frozen copy)
    lora_rank: int = 64
    lora_alpha: int = 128
    lora_targets: str = ("to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,"
                         "img_mlp.net.0.proj,img_mlp.net.2,txt_mlp.net.0.proj,txt_mlp.net.2")
    lora_init: str = "gaussian"
    gradient_checkpointing: bool = True
    sharding: str = "none"  # "none": accelerate decides (single / DDP); "fsdp2": fully_shard each block
    # data
    train_data: str = "data/ocr/train.parquet"  # data_process parquet, a directory of them, or a .txt
    eval_data: str = "data/ocr/test.parquet"
    prompts_per_step: int = 32  # global, over all ranks
    samples_per_prompt: int = 16  # K rollouts per prompt (all on one rank)
    # rollout
    height: int = 512
    width: int = 512
    num_inference_steps: int = 35
    true_cfg_scale: float = 1.0
    negative_prompt: str = " "
    max_sequence_length: int = 256
    rollout_chunk_size: int = 16  # images per pipeline call
    # reward
    reward: str = "ocr"
    reward_kwargs: str = "{}"  # JSON, passed to rewards.build_reward
    # DPO
    beta: float = 100.0
    pair_strategy: str = "best_worst"  # or "top_bottom": floor(K/2) pairs per group
    min_reward_margin: float = 0.0
    reverse_preference: bool = False  # control run: train towards the rejected sample
    sigma_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    updates_per_rollout: int = 1  # optimizer steps per rollout batch, fresh noise and sigma each
    micro_batch_pairs: int = 1  # pairs per forward/backward; gradients accumulate over micro-batches
    # optimisation
    learning_rate: float = 3e-4
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    lr_warmup_steps: int = 0  # constant LR after warm-up
    max_steps: int = 300
    max_nonfinite_in_a_row: int = 3
    # evaluation, logging, checkpoints
    eval_every: int = 20
    eval_samples_per_prompt: int = 1
    eval_inference_steps: int = 50
    max_eval_prompts: int = 0  # 0 = all
    checkpoint_every: int = 20
    checkpoints_total_limit: int = 3
    sample_grid_every: int = 20
    log_with: str = "wandb"  # "wandb" (offline without API key), "tensorboard" or "none"
    tracker_project: str = "qwen-image-online-dpo"
    output_dir: str = "outputs/online_dpo"
    resume_from_checkpoint: str = ""  # "", "latest" or a checkpoint directory
    seed: int = 0
    preset: str = ""


PRESETS = {
    # The tiny random Qwen-Image on a CPU with a reward it can learn (DESIGN.md's recipe):
    # LoRA on attention, the image MLP and proj_out; lr 3e-2; two updates per rollout batch.
    "cpu_tiny": dict(
        pretrained="tiny", dtype="float32", lora_rank=8, lora_alpha=8, gradient_checkpointing=False,
        lora_targets="to_q,to_k,to_v,to_out.0,add_q_proj,add_k_proj,add_v_proj,to_add_out,"
                     "img_mlp.net.0.proj,img_mlp.net.2,proj_out",
        train_data=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_prompts.txt"),
        eval_data=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_prompts.txt"),
        prompts_per_step=8, samples_per_prompt=8, height=64, width=64, num_inference_steps=4,
        eval_inference_steps=4, eval_samples_per_prompt=4, rollout_chunk_size=32, reward="brightness",
        learning_rate=3e-2, updates_per_rollout=2, micro_batch_pairs=8, max_steps=20, eval_every=10,
        checkpoint_every=10, sample_grid_every=10, log_with="none", max_sequence_length=64,
    ),
}


def validate(config: Config, world_size: int = 1):
    """Every rule checked before any model loads; errors name the field."""
    from pairing import PAIR_STRATEGIES, SIGMA_SCHEMES
    from rewards import REWARDS
    from trainer_utils import require

    require(config.samples_per_prompt >= 2, "samples_per_prompt", "need at least 2 samples per prompt to make a pair")
    require(config.prompts_per_step >= 1, "prompts_per_step", "must be >= 1")
    require(config.prompts_per_step % world_size == 0, "prompts_per_step",
            f"must be divisible by the number of processes ({world_size}): all K samples of a prompt stay on one rank")
    require(config.micro_batch_pairs >= 1, "micro_batch_pairs",
            "must be >= 1: a micro-batch holds whole (chosen, rejected) pairs, never half of one")
    require(math.isfinite(config.beta) and config.beta > 0, "beta", "must be a finite number > 0")
    require(config.reward in REWARDS, "reward", f"unknown reward {config.reward!r}; known: {', '.join(REWARDS)}")
    require(config.pair_strategy in PAIR_STRATEGIES, "pair_strategy", f"must be one of {PAIR_STRATEGIES}")
    require(config.sigma_scheme in SIGMA_SCHEMES, "sigma_scheme", f"must be one of {SIGMA_SCHEMES}")
    require(config.min_reward_margin >= 0, "min_reward_margin", "must be >= 0")
    require(config.train_mode in ("lora", "full"), "train_mode", "must be 'lora' or 'full'")
    require(config.sharding in ("none", "fsdp2"), "sharding", "must be 'none' or 'fsdp2'")
    require(config.dtype in ("bfloat16", "float32", "float16"), "dtype", "must be bfloat16, float16 or float32")
    require(config.height % 16 == 0 and config.height > 0, "height", "must be a positive multiple of 16")
    require(config.width % 16 == 0 and config.width > 0, "width", "must be a positive multiple of 16")
    require(config.num_inference_steps >= 1, "num_inference_steps", "must be >= 1")
    require(config.eval_inference_steps >= 1, "eval_inference_steps", "must be >= 1")
    require(1 <= config.max_sequence_length <= 1024, "max_sequence_length", "must be in [1, 1024]")
    require(config.true_cfg_scale >= 1.0, "true_cfg_scale", "must be >= 1 (1 disables CFG)")
    require(config.rollout_chunk_size >= 1, "rollout_chunk_size", "must be >= 1")
    require(config.lora_rank >= 1 and config.lora_alpha > 0, "lora_rank", "rank must be >= 1 and alpha > 0")
    require(bool(config.lora_targets.strip()) or config.train_mode == "full", "lora_targets", "must name modules")
    require(config.learning_rate > 0, "learning_rate", "must be > 0")
    require(config.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    require(config.updates_per_rollout >= 1, "updates_per_rollout", "must be >= 1")
    require(config.max_steps >= 1, "max_steps", "must be >= 1")
    require(config.max_nonfinite_in_a_row >= 1, "max_nonfinite_in_a_row", "must be >= 1")
    for field in ("eval_every", "checkpoint_every", "sample_grid_every", "checkpoints_total_limit",
                  "max_eval_prompts", "lr_warmup_steps"):
        require(getattr(config, field) >= 0, field, "must be >= 0 (0 disables)")
    require(config.eval_samples_per_prompt >= 1, "eval_samples_per_prompt", "must be >= 1")
    require(config.log_with in ("wandb", "tensorboard", "none"), "log_with", "must be wandb, tensorboard or none")
    try:
        json.loads(config.reward_kwargs)
    except json.JSONDecodeError as error:
        raise ValueError(f"config field `reward_kwargs`: not valid JSON ({error})") from None
    for field in ("train_data", "eval_data"):
        require(os.path.exists(getattr(config, field)), field, f"file {getattr(config, field)!r} does not exist")


def main(argv=None):
    from trainer_utils import parse_config

    config = parse_config(Config, PRESETS, argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    validate(config, world_size)
    return train(config)


def train(config: Config):
    # Imports after validation: a bad flag fails in a second, not after ~10 s of imports.
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import cast_training_params
    from tqdm.auto import tqdm

    import qwen_image as qi
    import trainer_utils as tu
    import dpo_loss
    from dpo_loss import noisy_latents, velocity_target
    from pairing import interleave, pair_stats, sample_pair_noise_and_sigmas, select_pairs
    from rewards import OCR_REWARDS, build_reward

    accelerator = Accelerator(log_with=None if config.log_with == "none" else config.log_with,
                              project_dir=config.output_dir)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise RuntimeError("launch with a MULTI_GPU accelerate config (configs/multi_gpu.yaml) and pass "
                           "--sharding fsdp2: the script shards the transformer itself (it samples with it too)")
    if int(os.environ.get("WORLD_SIZE", "1")) != world:
        raise RuntimeError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate set up {world} "
                           "process(es): on CPU set ACCELERATE_USE_CPU=true (see README, Distributed)")
    validate(config, world)
    set_seed(config.seed)
    stop = tu.StopFlag()
    dtype = getattr(torch, config.dtype)
    is_ocr = config.reward in OCR_REWARDS

    # ---- data, model, reward
    train_rows = tu.load_prompts(config.train_data, need_ocr_target=is_ocr)
    eval_rows = tu.load_prompts(config.eval_data, need_ocr_target=is_ocr)
    if config.max_eval_prompts:
        eval_rows = eval_rows[: config.max_eval_prompts]
    reward_fn = build_reward(config.reward, **json.loads(config.reward_kwargs))

    pipe = qi.load_pipeline(config.pretrained, dtype=dtype, device=device)
    transformer = pipe.transformer
    prompt_cache = qi.PromptCache(pipe, config.max_sequence_length)
    # every prompt this run will see is encoded once; then the text encoder leaves the accelerator
    prompt_cache.warm([r["prompt"] for r in train_rows + eval_rows] + [config.negative_prompt])
    prompt_cache.offload_text_encoder("cpu")

    reference = None
    if config.train_mode == "lora":
        qi.add_lora(transformer, config.lora_rank, config.lora_alpha, config.lora_targets.split(","), config.lora_init)
    else:
        reference = qi.make_frozen_reference(transformer)
        transformer.requires_grad_(True)
        for name in qi.dead_text_stream_modules(transformer):  # never reach the output: freeze
            transformer.get_submodule(name).requires_grad_(False)
    cast_training_params(transformer, dtype=torch.float32)  # fp32 trainable weights, AdamW state
    qi.set_gradient_checkpointing(transformer, config.gradient_checkpointing)
    params = [p for p in transformer.parameters() if p.requires_grad]

    if config.sharding == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for block in transformer.transformer_blocks:
            fully_shard(block)
        fully_shard(transformer)
        params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.weight_decay, eps=config.adam_epsilon)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.lr_warmup_steps)
    if config.sharding == "fsdp2":
        model = transformer  # FSDP2 reduces gradients itself
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    else:
        model, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    transformer.train()

    # ---- resume
    start_step, nonfinite_in_a_row = 0, 0
    checkpoint = tu.resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
    if checkpoint:
        state = tu.load_checkpoint(checkpoint, model, optimizer, lr_scheduler)
        start_step, nonfinite_in_a_row = state["step"], state.get("nonfinite_in_a_row", 0)
        accelerator.print(f"resumed from {checkpoint} at step {start_step}")
    metrics_log = tu.MetricsLog(accelerator, config.output_dir, resume_step=start_step if checkpoint else None)
    tu.setup_trackers(accelerator, config.log_with, config.tracker_project, tu.config_dict(config), config.output_dir)
    if accelerator.is_main_process:
        os.makedirs(os.path.join(config.output_dir, "samples"), exist_ok=True)
        with open(os.path.join(config.output_dir, "config.json"), "w") as f:
            json.dump(tu.config_dict(config), f, indent=1)

    rollout_settings = qi.RolloutSettings(height=config.height, width=config.width,
                                          num_inference_steps=config.num_inference_steps,
                                          true_cfg_scale=config.true_cfg_scale, negative_prompt=config.negative_prompt,
                                          chunk_size=config.rollout_chunk_size)
    eval_settings = qi.RolloutSettings(**{**rollout_settings.__dict__, "num_inference_steps": config.eval_inference_steps})

    def run_eval(step):
        transformer.eval()
        metrics, images, scores = tu.evaluate(pipe, prompt_cache, eval_rows, reward_fn, eval_settings,
                                              config.eval_samples_per_prompt, accelerator, exact_match=is_ocr)
        transformer.train()
        if accelerator.is_main_process and images:
            tu.image_grid(images[:32], [f"{s:.3f}" for s in scores[:32]]).save(
                os.path.join(config.output_dir, "samples", f"eval-{step:06d}.png"))
        metrics_log.log(metrics, step)
        return metrics

    def all_sum(*values):
        t = torch.tensor(values, dtype=torch.float64, device=device)
        return accelerator.reduce(t, reduction="sum").tolist() if world > 1 else t.tolist()

    def all_max(value):
        if world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return t.item()

    def velocity(module, x0, noise, sigmas, embeds, mask):
        return qi.predict_velocity(module, noisy_latents(x0, noise, sigmas), sigmas, embeds, mask,
                                   config.height, config.width)

    def reference_velocity(*args):
        with torch.no_grad():
            if reference is not None:
                return velocity(reference, *args)
            with qi.lora_disabled(transformer):
                return velocity(transformer, *args)

    if start_step == 0 and config.eval_every:
        run_eval(0)

    progress = tqdm(range(start_step, config.max_steps), initial=start_step, total=config.max_steps,
                    disable=not accelerator.is_local_main_process, desc="online DPO")
    step = start_step
    for step in range(start_step, config.max_steps):
        metrics = {}
        # 1-3. this rank's prompts, K rollouts each with the current policy (seeds: f(step, sample))
        t0 = time.perf_counter()
        rows = tu.prompts_for_step(train_rows, step, config.prompts_per_step, rank, world, config.seed)
        K = config.samples_per_prompt
        flat_rows = [row for row in rows for _ in range(K)]
        prompts = [row["prompt"] for row in flat_rows]
        group_ids = [f"{i}:{row['uid']}" for i, row in enumerate(rows) for _ in range(K)]
        seeds = [tu.derived_seed(config.seed, step, rank, j) % 2**31 for j in range(len(prompts))]
        transformer.eval()
        latents, images = qi.rollout(pipe, prompt_cache, prompts, seeds, rollout_settings)  # [N, S, 64]
        transformer.train()
        t1 = time.perf_counter()
        # 4. rewards
        rewards = torch.tensor(tu.score_rows(reward_fn, images, flat_rows), dtype=torch.float64)
        t2 = time.perf_counter()
        # 5. pairs: best vs worst per prompt group; tie groups give none
        pairs = select_pairs(group_ids, rewards, config.pair_strategy, config.min_reward_margin)  # [P, 2]
        stats = pair_stats(group_ids, rewards, pairs)
        if config.reverse_preference:
            pairs = pairs.flip(1)
        all_rewards = accelerator.gather(rewards.to(device)).cpu() if world > 1 else rewards
        pairs_total, tie_groups, no_pair_groups, gap_sum = all_sum(
            pairs.shape[0], stats["tie_groups"], stats["groups_without_pair"],
            stats["reward_gap_mean"] * pairs.shape[0])
        metrics.update({
            "data/prompt_uids": [u for uids in _gather_object([r["uid"] for r in rows], world) for u in uids],
            "reward/mean": all_rewards.mean().item(), "reward/std": all_rewards.std(unbiased=False).item(),
            "reward/max": all_rewards.max().item(), "reward/min": all_rewards.min().item(),
            "pairs/kept": pairs_total, "pairs/tie_groups_dropped": tie_groups,
            "pairs/groups_without_pair": no_pair_groups, "pairs/reward_gap": gap_sum / max(pairs_total, 1),
        })

        # 6-7. DPO updates on interleaved [c0, r0, c1, r1, ...]
        n_pairs = pairs.shape[0]
        if pairs_total == 0:
            metrics["update/skipped_no_pairs"] = 1.0
            accelerator.print(f"step {step}: no pairs (every group tied or below min_reward_margin); update skipped")
        else:
            if n_pairs:
                x0 = interleave(pairs, latents).to(device)  # [2P, S, 64]
                pair_prompts = interleave(pairs, prompts)
            else:  # this rank has no pair: it still joins every collective, with zero weight
                x0, pair_prompts = latents[:2].to(device), prompts[:2]
            # every rank runs the same number of micro-batches (the most any rank needs)
            n_micro = int(all_max(max(1, math.ceil(n_pairs / config.micro_batch_pairs))))
            loss_sum = acc_sum = margin_sum = 0.0  # over this rank's pairs and the successful updates
            good_updates = 0
            for update in range(config.updates_per_rollout):
                generator = torch.Generator().manual_seed(tu.derived_seed(config.seed, step, rank, update, 7) % 2**62)
                noise, sigmas = sample_pair_noise_and_sigmas(x0, generator, config.sigma_scheme,
                                                             logit_mean=config.logit_mean, logit_std=config.logit_std)
                target = velocity_target(x0, noise)
                update_sums = [0.0, 0.0, 0.0]
                for micro in range(n_micro):
                    lo = micro * config.micro_batch_pairs
                    hi = min(lo + config.micro_batch_pairs, n_pairs)
                    weight = 1.0
                    if hi <= lo:  # padding micro-batch: same shapes, no contribution
                        lo, hi, weight = 0, 1, 0.0
                    rows_ = slice(2 * lo, 2 * hi)
                    embeds, mask = prompt_cache(pair_prompts[rows_], device=device, dtype=dtype)
                    args = (x0[rows_], noise[rows_], sigmas[rows_], embeds, mask)
                    ref_pred = reference_velocity(*args)
                    sync = micro == n_micro - 1
                    with _no_sync(model, config.sharding, world, accelerator, sync):
                        model_pred = velocity(model, *args)
                        loss, m = dpo_loss.diffusion_dpo_loss(model_pred, ref_pred, target[rows_], config.beta)
                        # gradient of the mean over every pair of every rank (DDP/FSDP average ranks)
                        scale = weight * (hi - lo) * world / pairs_total
                        accelerator.backward(loss * scale)
                    for i, value in enumerate((loss.item(), m["implicit_acc"], m["reward_margin"])):
                        update_sums[i] += weight * value * (hi - lo)
                # one optimizer step per update; skipped (and counted) when anything is non-finite
                local_bad = float(not math.isfinite(update_sums[0]) or any(
                    p.grad is not None and not torch.isfinite(p.grad).all() for p in params))
                if all_sum(local_bad)[0] > 0:
                    optimizer.zero_grad(set_to_none=True)
                    nonfinite_in_a_row += 1
                    metrics["update/nonfinite_skipped"] = metrics.get("update/nonfinite_skipped", 0) + 1
                    accelerator.print(f"step {step}: non-finite loss or gradient, update skipped "
                                      f"({nonfinite_in_a_row} in a row)")
                    if nonfinite_in_a_row >= config.max_nonfinite_in_a_row:
                        raise FloatingPointError(
                            f"{nonfinite_in_a_row} non-finite updates in a row (max_nonfinite_in_a_row); stopping")
                    continue
                nonfinite_in_a_row = 0
                grad_norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                metrics["update/grad_norm"] = float(grad_norm)
                good_updates += 1
                loss_sum, acc_sum, margin_sum = (a + b for a, b in zip((loss_sum, acc_sum, margin_sum), update_sums))
            if good_updates:
                loss_total, acc_total, margin_total = all_sum(loss_sum, acc_sum, margin_sum)
                denominator = pairs_total * good_updates
                metrics.update({"dpo/loss": loss_total / denominator, "dpo/implicit_acc": acc_total / denominator,
                                "dpo/implicit_reward_margin": margin_total / denominator})
        t3 = time.perf_counter()
        metrics.update({"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/update_s": t3 - t2,
                        "lr": lr_scheduler.get_last_lr()[0]})

        # 8. samples, logs, evaluation, checkpoints
        if accelerator.is_main_process and config.sample_grid_every and (step + 1) % config.sample_grid_every == 0 and n_pairs:
            shown = pairs[:8]
            tu.pair_grid([images[c] for c in shown[:, 0]], [images[r] for r in shown[:, 1]],
                         rewards[shown[:, 0]].tolist(), rewards[shown[:, 1]].tolist()).save(
                os.path.join(config.output_dir, "samples", f"pairs-{step + 1:06d}.png"))
        metrics_log.log(metrics, step + 1)
        progress.update(1)
        progress.set_postfix(loss=f"{metrics.get('dpo/loss', float('nan')):.4f}", reward=f"{metrics['reward/mean']:.4f}")
        if config.eval_every and (step + 1) % config.eval_every == 0:
            run_eval(step + 1)
        stopping = all_sum(float(stop.raised))[0] > 0
        if stopping or (config.checkpoint_every and (step + 1) % config.checkpoint_every == 0):
            tu.save_checkpoint(config.output_dir, step + 1, model, optimizer, lr_scheduler,
                               {"nonfinite_in_a_row": nonfinite_in_a_row}, accelerator.is_main_process,
                               config.checkpoints_total_limit)
        if stopping:
            accelerator.print(f"stop signal: checkpoint written at step {step + 1}, exiting")
            accelerator.end_training()
            return {"stopped_at": step + 1}
    progress.close()

    # ---- final weights, in the format diffusers loads; per-rank checksums show replicas agree
    checksum = sum(float(_full(p).double().abs().sum()) for p in params)
    metrics_log.log({"final/param_checksums": _gather_object(checksum, world)}, config.max_steps)
    final_dir = _save_final(config, model, transformer, accelerator)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"final_dir": final_dir, "step": config.max_steps}


def _gather_object(obj, world):
    """[obj of rank 0, obj of rank 1, ...]"""
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _full(p):
    """A parameter as one full tensor (FSDP2 holds DTensor shards)."""
    p = p.detach()
    return p.full_tensor() if hasattr(p, "full_tensor") else p


def _no_sync(model, sharding, world, accelerator, sync: bool):
    """Gradient accumulation: reduce across ranks only on the last micro-batch."""
    import contextlib

    if world == 1 or sync:
        return contextlib.nullcontext()
    if sharding == "fsdp2":
        @contextlib.contextmanager
        def fsdp_no_sync():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return fsdp_no_sync()
    return accelerator.no_sync(model)


def _save_final(config, model, transformer, accelerator):
    """LoRA: output_dir/lora/pytorch_lora_weights.safetensors; full: output_dir/transformer/."""
    import qwen_image as qi
    import trainer_utils as tu
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    full_state = get_model_state_dict(model, options=tu._options())  # collective under FSDP
    if not accelerator.is_main_process:
        return None
    if config.train_mode == "lora":
        out = os.path.join(config.output_dir, "lora")
        qi.save_lora(transformer, out, state_dict=full_state)
    else:  # a directory QwenImageTransformer2DModel.from_pretrained reads
        from safetensors.torch import save_file

        out = os.path.join(config.output_dir, "transformer")
        os.makedirs(out, exist_ok=True)
        transformer.save_config(out)
        save_file({k: v.contiguous() for k, v in full_state.items()},
                  os.path.join(out, "diffusion_pytorch_model.safetensors"))
    return out


if __name__ == "__main__":
    main()
