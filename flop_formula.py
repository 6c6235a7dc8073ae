"""The FLOP arithmetic of Qwen-Image's transformer: forward, backward and rollout FLOPs of
one sample or batch, achieved TFLOP/s and MFU (`throughput`) and the GPU peaks MFU is read
against. perf.py's per-step accounting in the trainers builds on it.

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


# Dense bf16 tensor-core peaks (TFLOP/s, without sparsity) from the vendors' data sheets. MFU is
# reported against what you pass as --peak_tflops; on an H100 a bf16 8192^3 matmul reached ~800
# TFLOP/s in practice (DESIGN.md), so ~80 % of the sheet value is the practical ceiling.
GPU_PEAK_BF16_TFLOPS = {
    "H100 SXM": 989, "H100 PCIe": 756, "H200": 989, "H800 SXM": 989, "A100": 312, "L40S": 362,
    "RTX 4090": 165, "B200": 2250,
}

MLP_RATIO = 4
TIMESTEP_CHANNELS = 256


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
