"""Speed levers and their accounting: attention backend, regional torch.compile with a recompile
counter, reward scoring overlapped with sampling, and the FLOP arithmetic of Qwen-Image's
transformer (achieved TFLOP/s and MFU).

The FLOP formula reads the transformer's config dict (`qwen_image.QWEN_IMAGE_TRANSFORMER_CONFIG` or a
model's `.config`): it is the arithmetic of diffusers' `QwenImageTransformer2DModel` (a dual-stream
MMDiT: image and text tokens have their own projections and MLPs and meet in one joint attention).
It counts matrix-multiply FLOPs only (2 per multiply-add), as `torch.utils.flop_counter` does;
norms, activations and RoPE are a few per cent of a forward at real size and are left out.

Forward FLOPs of one sample, N image tokens, T text tokens (padded length), width d, L blocks,
in_channels c, text width D, output channels o = patch^2 * out_channels, MLP ratio 4:

    embed  = 2 N c d + 2 T D d + 2 (256 d + d^2)                 img_in, txt_in, timestep MLP
    block  = 2 (N + T) d^2 (3 + 1 + 2*4)                          q/k/v, out, MLP, both streams
           + 4 (N + T)^2 d                                         joint attention: QK^T and PV
           + 2 * 2 * 6 d^2                                         img_mod and txt_mod (per sample)
    head   = 2 * 2 d^2 + 2 N d o                                   norm_out, proj_out
    LoRA   = 2 r (in + out) per token of each adapted Linear
    forward = embed + L * block + head (+ LoRA)

Real config at 512x512 (N = 1024) with T = 64 text tokens: 15.67 TFLOP per forward (T = 0: 14.7,
T = 256: 18.6). Backward counts what autograd actually runs: an input gradient (= the forward
FLOPs of that matmul) wherever the input requires grad and the output reaches the loss, a weight
gradient for trainable weights, the attention backward as flash attention does it (2.5x its
forward: the scores are recomputed; torch's FLOP counter uses the same rule), and with gradient
checkpointing one more forward of every block. Under LoRA the first block's q/k/v inputs need no
gradient and the last block's text-stream outputs never reach the loss, so their backward is not
run: the formula follows that, which is why it agrees with the counter on a 2-block model.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import math
import os
import time

import torch

# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets. MFU is
# reported against what you pass as --peak_tflops; on an H100 a bf16 8192^3 matmul reached ~800
# TFLOP/s in practice (DESIGN.md), so ~80 % of the sheet value is the practical ceiling.
GPU_PEAK_BF16_TFLOPS = {
    "H100 SXM": 989, "H100 PCIe": 756, "H200": 989, "H800 SXM": 989, "A100": 312, "L40S": 362,
    "RTX 4090": 165, "B200": 2250,
}

MLP_RATIO = 4
TIMESTEP_CHANNELS = 256


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
# FLOPs


def _dims(config) -> dict:
    get = config.get if isinstance(config, dict) else (lambda k, default=None: getattr(config, k, default))
    d = get("num_attention_heads") * get("attention_head_dim")
    return dict(d=d, layers=get("num_layers"), c_in=get("in_channels"), text=get("joint_attention_dim"),
                c_out=get("patch_size") ** 2 * (get("out_channels") or get("in_channels")))


def _block_linears(d: int):
    """(module suffix inside a block, in, out, token kind) of every Linear of one block."""
    f = MLP_RATIO * d
    return [
        ("attn.to_q", d, d, "img"), ("attn.to_k", d, d, "img"), ("attn.to_v", d, d, "img"),
        ("attn.to_out.0", d, d, "img"), ("img_mlp.net.0.proj", d, f, "img"), ("img_mlp.net.2", f, d, "img"),
        ("attn.add_q_proj", d, d, "txt"), ("attn.add_k_proj", d, d, "txt"), ("attn.add_v_proj", d, d, "txt"),
        ("attn.to_add_out", d, d, "txt"), ("txt_mlp.net.0.proj", d, f, "txt"), ("txt_mlp.net.2", f, d, "txt"),
        ("img_mod.1", d, 6 * d, "sample"), ("txt_mod.1", d, 6 * d, "sample"),
    ]


def _outer_linears(dims: dict):
    d = dims["d"]
    return [("img_in", dims["c_in"], d, "img"), ("txt_in", dims["text"], d, "txt"),
            ("time_text_embed.timestep_embedder.linear_1", TIMESTEP_CHANNELS, d, "sample"),
            ("time_text_embed.timestep_embedder.linear_2", d, d, "sample"),
            ("norm_out.linear", d, 2 * d, "sample"), ("proj_out", d, dims["c_out"], "img")]


def _adapted(name: str, targets) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def _lora_on(block: int, layers: int, suffix: str, targets) -> bool:
    # qwen_image.add_lora skips the last block's dead text-stream modules (add_q_proj, to_add_out, txt_mlp)
    dead = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
    return _adapted(suffix, targets) and not (block == layers - 1 and suffix in dead)


def forward_flops(config, image_tokens: int, text_tokens: int, lora_rank: int = 0, lora_targets=()) -> int:
    """Matmul FLOPs of one transformer forward for ONE sample (see the module docstring)."""
    tokens = {"img": image_tokens, "txt": text_tokens, "sample": 1}
    outer = sum(2 * i * o * tokens[k] for _, i, o, k in _outer_linears(_dims(config)))
    return outer + _blocks_forward_flops(config, image_tokens, text_tokens, lora_rank, lora_targets)


def _blocks_forward_flops(config, image_tokens: int, text_tokens: int, lora_rank: int = 0, lora_targets=()) -> int:
    """The transformer blocks' share of forward_flops (what gradient checkpointing recomputes)."""
    dims = _dims(config)
    d, layers = dims["d"], dims["layers"]
    tokens = {"img": image_tokens, "txt": text_tokens, "sample": 1}
    seq = image_tokens + text_tokens
    total = 0
    for block in range(layers):
        total += 4 * seq * seq * d
        for suffix, i, o, kind in _block_linears(d):
            total += 2 * i * o * tokens[kind]
            if lora_rank and _lora_on(block, layers, suffix, lora_targets):
                total += 2 * lora_rank * (i + o) * tokens[kind]
    return total


def backward_flops(config, image_tokens: int, text_tokens: int, train_mode: str = "lora", lora_rank: int = 0,
                   lora_targets=(), gradient_checkpointing: bool = False) -> int:
    """Matmul FLOPs autograd runs in the backward of one sample's policy forward (see the module
    docstring), including the recomputed forward under gradient checkpointing."""
    dims = _dims(config)
    d, layers = dims["d"], dims["layers"]
    tokens = {"img": image_tokens, "txt": text_tokens, "sample": 1}
    full = train_mode == "full"
    seq = image_tokens + text_tokens
    total = 0

    def linear(i, o, kind, input_grad, weight_grad, lora):
        n = tokens[kind]
        flops = 2 * i * o * n * (int(input_grad) + int(weight_grad))
        if lora:  # dB, grad into A's output, dA, and (if the input needs it) dx through A
            flops += 2 * lora_rank * n * (2 * o + i + (i if input_grad else 0))
        return flops

    # Outside the blocks: under LoRA nothing before the first block needs a gradient; in full mode the
    # embedding weights are trained (their inputs are data). proj_out's input always needs one.
    if full:
        total += sum(2 * i * o * tokens[k] for name, i, o, k in _outer_linears(dims) if name != "proj_out")
    total += linear(d, dims["c_out"], "img", input_grad=True, weight_grad=full, lora=False)
    img_rg = txt_rg = temb_rg = full  # does the image / text stream / time embedding require grad
    for block in range(layers):
        last = block == layers - 1
        mods = {s: (i, o, k) for s, i, o, k in _block_linears(d)}
        lora = {s: bool(lora_rank) and _lora_on(block, layers, s, lora_targets) for s in mods}
        # modulation from the time embedding: weight grads in full mode only
        total += sum(linear(*mods[m], input_grad=temb_rg, weight_grad=full, lora=lora[m]) for m in ("img_mod.1", "txt_mod.1"))
        modulation_rg = full or temb_rg or lora["img_mod.1"] or lora["txt_mod.1"]
        img_in_rg, txt_in_rg = img_rg or modulation_rg, txt_rg or modulation_rg
        qkv_rg = False
        for stream, names, in_rg in (("img", ("attn.to_q", "attn.to_k", "attn.to_v"), img_in_rg),
                                     ("txt", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), txt_in_rg)):
            for m in names:
                total += linear(*mods[m], input_grad=in_rg, weight_grad=full and not (last and m == "attn.add_q_proj"),
                                lora=lora[m])
                qkv_rg = qkv_rg or in_rg or full or lora[m]
        if qkv_rg:
            total += 10 * seq * seq * d  # flash-style attention backward: 2.5x the forward (scores recomputed)
        # image stream after attention: always reaches the loss
        total += linear(*mods["attn.to_out.0"], input_grad=qkv_rg, weight_grad=full, lora=lora["attn.to_out.0"])
        img_rg = img_in_rg or qkv_rg or full or lora["attn.to_out.0"]
        for m in ("img_mlp.net.0.proj", "img_mlp.net.2"):
            total += linear(*mods[m], input_grad=img_rg, weight_grad=full, lora=lora[m])
            img_rg = img_rg or full or lora[m]
        # text stream after attention: dead in the last block (its output is never used)
        if not last:
            total += linear(*mods["attn.to_add_out"], input_grad=qkv_rg, weight_grad=full, lora=lora["attn.to_add_out"])
            txt_rg = txt_in_rg or qkv_rg or full or lora["attn.to_add_out"]
            for m in ("txt_mlp.net.0.proj", "txt_mlp.net.2"):
                total += linear(*mods[m], input_grad=txt_rg, weight_grad=full, lora=lora[m])
                txt_rg = txt_rg or full or lora[m]
    if gradient_checkpointing:  # every block's forward runs again in the backward
        total += _blocks_forward_flops(config, image_tokens, text_tokens, lora_rank, lora_targets)
    return int(total)


def rollout_flops(config, image_tokens: int, text_tokens: int, steps: int, images: int, cfg: bool = False,
                  lora_rank: int = 0, lora_targets=(), negative_text_tokens: int | None = None,
                  blocks_run_frac: float = 1.0) -> int:
    """steps x images x forward (the policy samples with its adapters on); CFG adds the negative
    prompt's forward. VAE decode and the (cached) text encoder are not counted. blocks_run_frac:
    the fraction of block forwards a step cache lets run (perf/rollout_blocks_run_frac); the parts
    outside the blocks run on every step."""
    texts = [text_tokens] + ([text_tokens if negative_text_tokens is None else negative_text_tokens] if cfg else [])
    fwd = 0
    for text in texts:
        blocks = _blocks_forward_flops(config, image_tokens, text, lora_rank, lora_targets)
        fwd += forward_flops(config, image_tokens, text, lora_rank, lora_targets) - (1 - blocks_run_frac) * blocks
    return int(steps * images * fwd)


def dpo_update_flops(config, image_tokens: int, text_tokens: int, pairs: int, train_mode: str = "lora",
                     lora_rank: int = 0, lora_targets=(), gradient_checkpointing: bool = False,
                     negative_text_tokens: int | None = None) -> int:
    """One DPO update over `pairs` pairs (2 samples each): per sample the reference forward (LoRA
    off, or the frozen copy), the policy forward and its backward; under true CFG
    (negative_text_tokens given) each of them also on the negative prompt."""
    return update_flops(config, image_tokens, [text_tokens] * (2 * pairs), 2 * max(pairs, 1), 1, train_mode,
                        lora_rank, lora_targets, gradient_checkpointing, negative_length=negative_text_tokens)


def image_tokens_for(height: int, width: int) -> int:
    """Packed latent tokens of one image: VAE /8, patch 2."""
    return (height // 16) * (width // 16)


def throughput(flops: float, seconds: float, peak_tflops: float = 0.0, devices: int = 1) -> dict:
    """Achieved TFLOP/s per device, and MFU when the device's peak is known."""
    achieved = flops / max(seconds, 1e-12) / devices / 1e12
    out = {"tflops_per_device": achieved}
    if peak_tflops > 0:
        out["mfu"] = achieved / peak_tflops
    return out


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


def update_step_flops(model_config, image_tokens: int, pair_lengths: list[int], micro_batch_pairs: int,
                      updates: int = 1, train_mode: str = "lora", lora_rank: int = 0, lora_targets=(),
                      gradient_checkpointing: bool = False, negative_length: int | None = None) -> int:
    """FLOPs of policy.dpo_update on this rank: pair_lengths holds the 2P interleaved rows' prompt
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
