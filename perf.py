"""Speed levers and their accounting: attention backend, regional torch.compile with a recompile
counter, reward scoring overlapped with sampling, and the per-step FLOP accounting of the trainers
(achieved TFLOP/s and MFU). The FLOP arithmetic of Qwen-Image's transformer (the formula) lives in
flop_formula.py.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import time

import torch

from flop_formula import _blocks_forward_flops, _dims, backward_flops, forward_flops, image_tokens_for, throughput


# ----------------------------------------------------------------------------------------------
# Attention backend and regional compile

# Backends that need an NVIDIA GPU even when their package imports (diffusers' requirement check
# only looks at packages).
_CUDA_ONLY_BACKENDS = ("flash", "flash_varlen", "_flash_3", "_flash_varlen_3", "sage", "sage_varlen",
                       "_sage_qk_int8_pv_fp8_cuda", "_sage_qk_int8_pv_fp8_cuda_sm90", "_sage_qk_int8_pv_fp16_cuda",
                       "_sage_qk_int8_pv_fp16_triton", "xformers", "_native_cudnn", "_native_efficient", "_native_flash")


def available_attention_backends() -> list[str]:
    """diffusers attention backends usable on this machine: the package is installed (diffusers'
    own requirement check) and, for GPU kernels, a CUDA device is present. `*_hub` backends
    download their kernels at run time and are never offered (no network on training nodes)."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    names = []
    for backend in AttentionBackendName:
        if backend.value.endswith("_hub"):
            continue
        if backend.value in _CUDA_ONLY_BACKENDS and not torch.cuda.is_available():
            continue
        try:
            _check_attention_backend_requirements(backend)
        except (RuntimeError, ImportError, ValueError):
            continue
        names.append(backend.value)
    return names


def check_attention_backend(name: str):
    """Config-time check: `config field `attention_backend`: ...` naming what is available."""
    if name == "native":  # always there; skip importing diffusers
        return
    available = available_attention_backends()
    if name not in available:
        raise ValueError(f"config field `attention_backend`: {name!r} is not usable on this machine; "
                         f"available: {', '.join(available)}")


def set_attention_backend(transformer, name: str):
    """Every attention of the transformer through diffusers' dispatcher backend `name`. "native"
    (torch SDPA) is what diffusers uses by default, so it changes nothing."""
    inner = getattr(transformer, "module", transformer)
    inner.set_attention_backend(name)


def compile_transformer_blocks(transformer, backend: str = "inductor", dynamic: bool | None = None):
    """Regional compile: torch.compile each repeated transformer block (diffusers'
    `compile_repeated_blocks`), one compiled graph shared by all 60 blocks, for the rollout and the
    training forward alike. Call after LoRA is added and before the first forward."""
    inner = getattr(transformer, "module", transformer)
    inner.compile_repeated_blocks(backend=backend, dynamic=dynamic)


class CompileCounter:
    """Frames torch.compile has compiled (first compiles and recompiles) since the last call.
    A run warms up in its first step (no-grad rollout, reference with adapters off, policy with
    grad, the text length made dynamic); after that every step should report 0."""

    def __init__(self):
        self.seen = self.total()

    @staticmethod
    def total() -> int:
        from torch._dynamo.utils import counters

        return int(counters["frames"]["ok"])

    def new(self) -> int:
        now = self.total()
        new, self.seen = now - self.seen, now
        return new


# ----------------------------------------------------------------------------------------------
# Reward overlap


class OverlappedScorer:
    """Scores rollout chunks on one worker thread while the next chunk is sampled: pass it as
    `qwen_image_rollout.rollout(..., on_chunk=scorer)`, then `scorer.results()` waits for the last chunk and
    returns the scores in rollout order. Sampling releases the GIL inside torch, and so do PP-OCR's
    onnxruntime and an HTTP reward's socket waits, so the two really run at once.

    `score_chunk(images, start) -> list[float]` scores images[start : start + len(images)] of the
    rollout. The scores equal the sequential path's whenever the reward scores each image
    independently of the others in its batch (ocr, ocr_server, brightness, jpeg_compressibility).
    """

    def __init__(self, score_chunk):
        self.score_chunk = score_chunk
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        self.futures = []
        self.wait_s = 0.0  # time spent waiting for scores after sampling ended

    def __call__(self, start: int, latents, images):
        self.futures.append(self.pool.submit(self.score_chunk, images, start))

    def results(self) -> list[float]:
        begin = time.perf_counter()
        scores = [float(s) for future in self.futures for s in future.result()]
        self.wait_s = time.perf_counter() - begin
        return scores

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for future in self.futures:  # on an error, do not start chunks still queued
            future.cancel()
        self.pool.shutdown(wait=True)


# ----------------------------------------------------------------------------------------------
# Per-step accounting in the trainers


def text_lengths(prompt_cache, prompts) -> list[int]:
    """Token length of each prompt's cached embedding (after max_sequence_length)."""
    return [int(prompt_cache([p])[0].shape[1]) for p in prompts]


def rollout_step_flops(model_config, image_tokens: int, lengths: list[int], chunk_size: int, steps: int,
                       cfg: bool = False, negative_length: int = 0, lora_rank: int = 0, lora_targets=(),
                       fixed_chunk_shape: bool = True, block_forwards: list[dict] | None = None) -> int:
    """FLOPs of qwen_image_rollout.rollout: each chunk runs at its longest prompt's length (padding), and a
    short last chunk at the full chunk size when fixed_chunk_shape. `block_forwards` (rollout's
    per-chunk {text tokens: block forwards x rows run}, under a step cache): the blocks count only
    where they ran; everything outside the blocks runs on every step."""
    total = 0
    for index, start in enumerate(range(0, len(lengths), chunk_size)):
        chunk = lengths[start:start + chunk_size]
        images = chunk_size if fixed_chunk_shape else len(chunk)
        texts = [max(chunk)] + ([negative_length] if cfg else [])
        for text in texts:
            total += steps * images * forward_flops(model_config, image_tokens, text, lora_rank, lora_targets)
        if block_forwards is not None:  # replace the full blocks' share with the counted forwards
            for text in texts:
                total -= steps * images * _blocks_forward_flops(model_config, image_tokens, text, lora_rank, lora_targets)
            for text, rows in block_forwards[index].items():
                total += rows * block_flops(model_config, image_tokens, text, lora_rank, lora_targets)
    return int(total)


def block_flops(config, image_tokens: int, text_tokens: int, lora_rank: int = 0, lora_targets=()) -> float:
    """One block's forward FLOPs for one sample (the blocks' mean: the last block's dead text-stream
    modules may carry no LoRA)."""
    return _blocks_forward_flops(config, image_tokens, text_tokens, lora_rank, lora_targets) / _dims(config)["layers"]


def blocks_run_fraction(block_forwards: list[dict], layers: int, forwards: int) -> float:
    """Block forwards run (rollout's counts, rows summed) over the `forwards` x `layers` a rollout
    without a cache runs; `forwards` = steps x rows x (2 with CFG)."""
    return sum(sum(chunk.values()) for chunk in block_forwards) / max(forwards * layers, 1)


def update_flops(model_config, image_tokens: int, row_lengths: list[int], rows_per_micro: int, updates: int = 1,
                 train_mode: str = "lora", lora_rank: int = 0, lora_targets=(), gradient_checkpointing: bool = False,
                 reference: bool = True, old: bool = False, negative_length: int | None = None,
                 forward_only: bool = False) -> int:
    """FLOPs of an update on this rank, any objective: row_lengths holds its rows' prompt lengths in
    micro-batch order (DPO: the 2P interleaved rows, 2 x micro_batch_pairs a micro-batch; the group
    objectives: whole groups, K x micro_batch_groups), each micro-batch at its longest prompt. Per
    row: the policy forward and its backward, the reference forward (LoRA off) when `reference`, the
    old adapter's forward when `old`. negative_length: the negative prompt's length under true CFG
    (true_cfg_scale > 1): every prediction is then qwen_image.predict_velocity's two forwards,
    positive and negative prompt, and the backward runs through both. forward_only: the policy's
    no-grad forward alone (AWM's rollout-policy predictions)."""
    rank = lora_rank if train_mode == "lora" else 0

    def per_row(text):
        flops = forward_flops(model_config, image_tokens, text, rank, lora_targets)
        if forward_only:
            return flops
        flops += backward_flops(model_config, image_tokens, text, train_mode, rank, lora_targets,
                                gradient_checkpointing)
        flops += forward_flops(model_config, image_tokens, text) if reference else 0
        flops += forward_flops(model_config, image_tokens, text, rank, lora_targets) if old else 0
        return flops

    negative = per_row(negative_length) if negative_length is not None else 0
    total = 0
    for start in range(0, len(row_lengths), rows_per_micro):
        micro = row_lengths[start:start + rows_per_micro]
        total += len(micro) * (per_row(max(micro)) + negative)
    return updates * total


def dpo_update_flops(config, image_tokens: int, text_tokens: int, pairs: int, train_mode: str = "lora",
                     lora_rank: int = 0, lora_targets=(), gradient_checkpointing: bool = False,
                     negative_text_tokens: int | None = None) -> int:
    """One DPO update over `pairs` pairs (2 samples each): per sample the reference forward (LoRA
    off, or the frozen copy), the policy forward and its backward; under true CFG
    (negative_text_tokens given) each of them also on the negative prompt."""
    return update_flops(config, image_tokens, [text_tokens] * (2 * pairs), 2 * max(pairs, 1), 1, train_mode,
                        lora_rank, lora_targets, gradient_checkpointing, negative_length=negative_text_tokens)


def update_step_flops(model_config, image_tokens: int, pair_lengths: list[int], micro_batch_pairs: int,
                      updates: int = 1, train_mode: str = "lora", lora_rank: int = 0, lora_targets=(),
                      gradient_checkpointing: bool = False, negative_length: int | None = None) -> int:
    """FLOPs of dpo_update.dpo_update on this rank: pair_lengths holds the 2P interleaved rows' prompt
    lengths (dpo_update_flops for each micro-batch); negative_length under true CFG (update_flops)."""
    return update_flops(model_config, image_tokens, pair_lengths, 2 * micro_batch_pairs, updates, train_mode,
                        lora_rank, lora_targets, gradient_checkpointing, negative_length=negative_length)


def update_tflop(config, model_config, prompt_cache, row_prompts: list[str], rows_per_micro: int,
                 reference: bool = True, old: bool = False, forwards_per_row: int = 1,
                 extra_policy_forwards: int = 0, updates: int | None = None) -> float:
    """TFLOP of one online update (update_flops) from the trainer's config, for perf/update_tflop;
    with true_cfg_scale > 1 each prediction also runs on the negative prompt (Policy.conditioning).
    forwards_per_row: the passes over each row per update (grpo: one per trained SDE step; the group
    objectives: one per trained timestep). updates: the updates over these rows (default
    updates_per_rollout; 1 for one part of a "disjoint" split, counted part by part).
    extra_policy_forwards: no-grad policy forwards over every row besides (AWM: the rollout policy's
    likelihoods of updates 2..U, computed before the first optimizer step)."""
    negative = text_lengths(prompt_cache, [config.negative_prompt])[0] if config.true_cfg_scale > 1 else None
    common = (model_config, image_tokens_for(config.height, config.width), text_lengths(prompt_cache, row_prompts),
              rows_per_micro)
    lora = (config.train_mode, config.lora_rank, tuple(config.lora_targets.split(",")), config.gradient_checkpointing)
    updates = config.updates_per_rollout if updates is None else updates
    total = update_flops(*common, updates * forwards_per_row, *lora, reference, old, negative)
    if extra_policy_forwards:
        total += update_flops(*common, extra_policy_forwards, *lora, False, False, negative, forward_only=True)
    return total / 1e12


def step_metrics(config, model_config, prompt_cache, prompts, update_tflop: float, rollout_s: float,
                 update_s: float, step_s: float, block_forwards: list[dict] | None = None) -> dict:
    """perf/* metrics of one online step on this rank: FLOPs, achieved TFLOP/s per device of the
    rollout, the update (its TFLOP as the objective counted them: update_tflop) and the whole step,
    and MFU when config.peak_tflops is set. `block_forwards`: the rollout's counted block forwards
    (qwen_image_rollout.rollout) under a step cache: its FLOPs count only those, and
    perf/rollout_blocks_run_frac logs the fraction run."""
    targets = tuple(config.lora_targets.split(","))
    image_tokens = image_tokens_for(config.height, config.width)
    cfg = config.true_cfg_scale > 1.0
    rollout = rollout_step_flops(model_config, image_tokens, text_lengths(prompt_cache, prompts),
                                 config.rollout_chunk_size, config.num_inference_steps, cfg,
                                 text_lengths(prompt_cache, [config.negative_prompt])[0] if cfg else 0,
                                 config.lora_rank if config.train_mode == "lora" else 0, targets,
                                 block_forwards=block_forwards)
    update = update_tflop * 1e12
    metrics = {"perf/rollout_tflop": rollout / 1e12, "perf/update_tflop": update_tflop,
               "perf/rollout_tflops_per_s": throughput(rollout, rollout_s)["tflops_per_device"],
               "perf/update_tflops_per_s": throughput(update, update_s)["tflops_per_device"],
               "perf/step_tflops_per_s": throughput(rollout + update, step_s)["tflops_per_device"]}
    if block_forwards is not None:
        rows = math.ceil(len(prompts) / config.rollout_chunk_size) * config.rollout_chunk_size  # fixed chunk shape
        metrics["perf/rollout_blocks_run_frac"] = blocks_run_fraction(
            block_forwards, _dims(model_config)["layers"], config.num_inference_steps * rows * (2 if cfg else 1))
    if config.peak_tflops > 0:
        metrics["perf/mfu"] = metrics["perf/step_tflops_per_s"] / config.peak_tflops
    return metrics


def validate_config(config, require):
    """The speed levers' config rules (trainers call this from their validate)."""
    check_attention_backend(config.attention_backend)
    require(config.peak_tflops >= 0, "peak_tflops", "must be >= 0 (0: MFU not logged)")
    require(config.compile_backend in ("inductor", "aot_eager", "eager"), "compile_backend",
            "must be inductor, aot_eager or eager")
    require(not (config.compile_transformer and config.sharding == "fsdp2"), "compile_transformer",
            "not supported with sharding=fsdp2 yet (untested: compile would have to wrap the blocks before fully_shard)")


# ----------------------------------------------------------------------------------------------
# CPU threads


def physical_cores() -> int:
    """Physical cores this process may run on: distinct (physical id, core id) pairs of /proc/cpuinfo
    (hyperthreads share a core's matmul units), at most the CPUs in its affinity mask."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        cores, package = set(), "0"
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "physical id":
                    package = value.strip()
                elif key.strip() == "core id":
                    cores.add((package, value.strip()))
    except OSError:
        cores = set()
    return max(1, min(logical, len(cores) or logical))


def choose_threads(load: float, cores: int) -> int:
    """Torch threads for a CPU run: one per core that the 1-minute load average leaves idle, and 1
    when the cores are busy (threads that wait for a core made a tiny-model step ~5x slower: 34 s
    instead of 7 s on 2 cores shared with other runs)."""
    return max(1, min(cores, round(cores - load)))


def set_cpu_threads(device_type: str) -> int | None:
    """On a CPU run whose user did not choose (OMP_NUM_THREADS unset): torch.set_num_threads to
    choose_threads(load now, physical cores), said in one line; never more threads than torch has.
    -> the threads set, or None (a GPU run, or OMP_NUM_THREADS given)."""
    if device_type != "cpu" or os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = physical_cores()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    threads = min(torch.get_num_threads(), choose_threads(load, cores))
    torch.set_num_threads(threads)
    print(f"cpu threads: {threads} ({cores} physical cores, load average {load:.1f}); "
          "set OMP_NUM_THREADS to choose", flush=True)
    return threads
