"""Plan a run before renting GPUs: parameters, per-GPU memory, FLOPs and step time of the online
recipe (any objective), from the real Qwen-Image architecture built on the meta device (no weights,
no download).

    python benchmarks/plan.py                                   # the DPO recipe on 4 x 80 GB, DDP and FSDP2
    python benchmarks/plan.py --world_size 8 --mfu 0.35 --peak_tflops 989 --micro_batch_pairs 2
    python benchmarks/plan.py --objective nft                   # a group objective: whole groups, old adapter

What it does:
- builds `QwenImageTransformer2DModel(**qwen_image.QWEN_IMAGE_TRANSFORMER_CONFIG)` (or `--config
  config.json`) under `torch.device("meta")`, applies the LoRA targets with the project's own
  `qwen_image.add_lora` (every target suffix must exist in the model), and counts parameters;
- activations: runs the training forward (`qwen_image.predict_velocity`) on meta tensors and sums
  the tensors autograd saves for backward (`torch.autograd.graph.saved_tensors_hooks`), block by
  block: exact for the graph the trainer builds, no memory used. The S x S attention probabilities
  the meta device's math attention saves are left out (flash / memory-efficient attention, what a
  GPU runs, and CPU SDPA do not keep them). Peak = saved tensors + a backward working set of half a
  block's saved tensors; with gradient checkpointing = tensors outside the blocks + each block's
  inputs + one block recomputed + the working set (the rule is checked against resident-set
  measurements on a small model in tests/test_perf.py: within 20 %). The training micro-batch is
  the objective's smallest: DPO 2 x micro_batch_pairs rows, a group objective whole groups,
  samples_per_prompt x micro_batch_groups rows; true CFG (--true_cfg_scale > 1) runs every
  prediction twice (prompt and negative prompt), both kept for the backward: twice the rows;
- the VAE decode working set: the peak of live tensors while `AutoencoderKLQwenImage` (the
  published config) decodes one rollout chunk, traced on the meta device (a TorchDispatchMode
  that adds up each new tensor's storage until it is freed); rollout sampling and decoding take
  turns, so a step's peak is the largest of the training activations, the sampler's working set
  and the decode's (checked against a measured decode of a small VAE in tests/test_perf.py);
- host memory per process: the prompt cache (qwen_image.PromptCache keeps it in pinned CPU memory)
  and the text encoder (Qwen2.5-VL-7B, moved to the CPU after the cache is warmed, kept there);
- memory per GPU for DDP (everything replicated; gradient buckets add one copy of the gradients)
  and FSDP2 (`fully_shard` per block: weights, gradients and AdamW state divided by the world size,
  plus two blocks gathered at a time), as the trainer holds them: frozen weights in `--dtype`,
  trainable weights, gradients and AdamW's two moments in fp32; the VAE in `--dtype`; an
  objective with an old policy adds its second LoRA adapter (fp32, the trainable LoRA's size);
  full mode adds the frozen reference copy in fp32 (policy.Policy casts the transformer to fp32
  before copying it, whatever --dtype; made before sharding, so replicated);
- FLOPs from flop_formula.py's formula (per row: the policy forward and backward, the reference's and the
  old adapter's forwards where the objective runs them, all twice under true CFG) and the step
  time at a given MFU.
Last line: a JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import flop_formula  # noqa: E402
import perf  # noqa: E402
import qwen_image as qi  # noqa: E402

GB = 1e9
# Qwen-Image's text encoder (Qwen2.5-VL-7B) and VAE, counted once on the meta device with the
# published configs: 8,292,166,656 and 126,892,531 parameters.
TEXT_ENCODER_PARAMS = 8_292_166_656
VAE_PARAMS = 126_892_531
BACKWARD_WORKSPACE_BLOCKS = 0.5  # transient gradients during one block's backward, in blocks' saved tensors
# objectives the planner knows beyond objectives.OBJECTIVES (until the trainer has them): objective_shape's
# (a group objective, has an old adapter, runs the reference, runs the old forward, passes per row); none now
EXTRA_OBJECTIVES: dict[str, tuple[bool, bool, bool, bool, int]] = {}


def build_meta_transformer(config: dict, train_mode: str = "lora", lora_rank: int = 64, lora_alpha: int = 128,
                           lora_targets=qi.RECIPE_LORA_TARGETS, dtype=torch.bfloat16):
    """The transformer on the meta device with the trainer's trainable set: LoRA through
    qwen_image.add_lora (fp32 adapters), or every parameter but the dead text-stream modules."""
    from diffusers import QwenImageTransformer2DModel

    with torch.device("meta"):
        transformer = QwenImageTransformer2DModel(**config).to(dtype)
        missing = [t for t in lora_targets if not any(n == t or n.endswith("." + t) for n, _ in transformer.named_modules())]
        if train_mode == "lora":
            if missing:
                raise ValueError(f"LoRA targets {missing} do not exist in the transformer")
            for p in qi.add_lora(transformer, lora_rank, lora_alpha, list(lora_targets)):
                p.data = p.data.float()  # what policy.Policy's cast_training_params does
        else:
            transformer.requires_grad_(True)
            for name in qi.dead_text_stream_modules(transformer):
                transformer.get_submodule(name).requires_grad_(False)
            transformer.float()
    return transformer


def count_params(transformer) -> dict:
    trainable = sum(p.numel() for p in transformer.parameters() if p.requires_grad)
    total = sum(p.numel() for p in transformer.parameters())
    base = sum(p.numel() for n, p in transformer.named_parameters() if "lora_" not in n)
    frozen_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters() if not p.requires_grad)
    trainable_bytes = sum(p.numel() * p.element_size() for p in transformer.parameters() if p.requires_grad)
    return dict(total=total, base=base, trainable=trainable, frozen_bytes=frozen_bytes, trainable_bytes=trainable_bytes)


def saved_activation_bytes(transformer, batch: int, image_tokens: int, text_tokens: int, height: int, width: int) -> dict:
    """Bytes autograd saves in one training forward of `batch` samples, split into the part saved
    inside each block, outside the blocks, and each block's inputs (what checkpointing keeps).
    Runs on whatever device the transformer is on (meta: free)."""
    device = next(transformer.parameters()).device
    param_ids = {id(p) for p in transformer.parameters()}
    seq = image_tokens + text_tokens
    saved, where = {}, ["outside"]
    keep = []  # keep saved tensors alive so ids are not reused

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in param_ids and id(base) not in saved:
            saved[id(base)] = (tuple(base.shape), base.numel() * base.element_size(), where[0])
            keep.append(base)
        return tensor

    block_inputs = []
    hooks = []
    for i, block in enumerate(transformer.transformer_blocks):
        def pre(module, args, kwargs, i=i):
            where[0] = i
            tensors = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
            block_inputs.append(sum(t.numel() * t.element_size() for t in tensors))
        hooks.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(block.register_forward_hook(lambda m, a, o: where.__setitem__(0, "outside")))
    dtype = next(p for p in transformer.parameters() if not p.requires_grad).dtype
    x = torch.zeros(batch, image_tokens, transformer.config.in_channels, device=device, dtype=dtype)
    e = torch.zeros(batch, text_tokens, transformer.config.joint_attention_dim, device=device, dtype=dtype)
    sigma = torch.full((batch,), 0.5, device=device)
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            qi.predict_velocity(transformer, x, sigma, e, None, height, width)
    finally:
        for h in hooks:
            h.remove()
    layers = len(transformer.transformer_blocks)
    per_block = [0] * layers
    outside = 0
    for shape, nbytes, place in saved.values():
        if shape[-2:] == (seq, seq):  # attention probabilities of the math path: not kept by flash/efficient SDPA
            continue
        if place == "outside":
            outside += nbytes
        else:
            per_block[place] += nbytes
    return dict(outside=outside, per_block=per_block, block_inputs=block_inputs)


def activation_peak_bytes(saved: dict, gradient_checkpointing: bool) -> int:
    """Peak activation memory of one forward + backward (see the module docstring)."""
    largest = max(saved["per_block"])
    workspace = BACKWARD_WORKSPACE_BLOCKS * largest
    if gradient_checkpointing:
        return int(saved["outside"] + sum(saved["block_inputs"]) + largest + workspace)
    return int(saved["outside"] + sum(saved["per_block"]) + workspace)


def objective_shape(name: str, dgpo_clip_range: float = 0.0, num_inference_steps: int = 35,
                    updates_per_rollout: int = 1) -> tuple[bool, bool, bool, bool, int]:
    """(a group objective, has an old adapter, runs the reference forward, runs the old forward,
    passes over each trained row per rollout batch) of an online objective, read from objectives.py
    with the trainer's defaults: dgpo always keeps its EMA adapter (it samples from it after
    switch_ema_ref) and runs its forward only with a clip range; a group objective trains each row at
    its `timesteps` (grpo: its trained SDE steps), once per rollout batch under update_split
    "disjoint" (the official default) or in every update under "all"; dpo once per update."""
    import objectives
    from train_online_dpo import Config

    if name not in objectives.OBJECTIVES:
        return EXTRA_OBJECTIVES[name]
    config = Config(objective=name, dgpo_clip_range=dgpo_clip_range, num_inference_steps=num_inference_steps,
                    updates_per_rollout=updates_per_rollout)
    objective = objectives.build(config)
    group = not isinstance(objective, objectives.DPO)
    if name == "grpo":
        import flow_grpo

        window = flow_grpo.resolve_window(config.grpo_sde_window, num_inference_steps, config.seed)
        timesteps = len(flow_grpo.sde_steps(num_inference_steps, window, config.grpo_timestep_fraction)[1])
    else:
        timesteps = getattr(objective, "timesteps", 1)
    split = getattr(objective, "update_split", "all")
    passes = timesteps * (updates_per_rollout if not group or split == "all" else 1)
    return (group, objective.uses_old_adapter, getattr(objective, "needs_reference", True),
            getattr(objective, "needs_old_prediction", objective.uses_old_adapter), passes)


class LiveTensorPeak(TorchDispatchMode):
    """Peak bytes of live tensors made inside the context: each op's new output storages (not
    views of its inputs, not parameters) are added when made and taken off when freed. Works on
    the meta device (shapes only: free). Workspaces a kernel frees before returning are not seen."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.sizes = 0, 0, {}

    def _free(self, key):
        self.live -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key in inputs or key in self.sizes:  # in place, a view, or already counted
                continue
            self.sizes[key] = t.untyped_storage().nbytes()
            self.live += self.sizes[key]
            weakref.finalize(t, self._free, key)
        self.peak = max(self.peak, self.live)
        return out


def vae_decode_peak_bytes(vae, batch: int, height: int, width: int) -> int:
    """Peak live-tensor bytes of vae.decode on `batch` latents of a height x width image, as
    qwen_image.decode_latents calls it (latents [b, z_dim, 1, H/8, W/8]); on the VAE's device and dtype."""
    weight = next(vae.parameters())
    z = torch.zeros(batch, vae.config.z_dim, 1, height // 8, width // 8, device=weight.device, dtype=weight.dtype)
    with torch.no_grad(), LiveTensorPeak() as tracker:
        vae.decode(z, return_dict=False)
    return tracker.peak


def memory_plan(params: dict, activations_no_ckpt: int, activations_ckpt: int, world_size: int,
                block_params_bytes: int, rollout_bytes: int, train_mode: str, dtype_bytes: int,
                vae_decode_bytes: int = 0, old_adapter: bool = False) -> dict:
    """Per-GPU bytes of each component for DDP and FSDP2."""
    trainable = params["trainable"]
    out = {}
    for strategy in ("ddp", "fsdp2"):
        shard = world_size if strategy == "fsdp2" else 1
        rows = {
            "frozen_weights": params["frozen_bytes"] / shard,
            "trainable_weights_fp32": params["trainable_bytes"] / shard,
            "gradients_fp32": 4 * trainable / shard,
            "adamw_state_fp32": 8 * trainable / shard,
        }
        rows["ddp_gradient_buckets"] = 4 * trainable if strategy == "ddp" else 0
        rows["fsdp2_gathered_blocks"] = 2 * block_params_bytes if strategy == "fsdp2" else 0
        if old_adapter:  # policy.add_old_adapter: a fp32 copy of the trained LoRA, sharded with its block
            rows["old_adapter_fp32"] = params["trainable_bytes"] / shard
        if train_mode == "full":  # deep-copied from the fp32 policy before sharding: fp32, replicated
            rows["frozen_reference_copy_fp32"] = params["base"] * 4
        rows["vae_weights"] = VAE_PARAMS * dtype_bytes
        base = sum(rows.values())
        rows["activations_checkpointed"] = activations_ckpt
        rows["activations_no_checkpointing"] = activations_no_ckpt
        rows["rollout_working_set"] = rollout_bytes
        rows["vae_decode_working_set"] = vae_decode_bytes
        # sampling, decoding and the update take turns: the largest of the three working sets counts
        rows["total_checkpointed"] = base + max(activations_ckpt, rollout_bytes, vae_decode_bytes)
        rows["total_no_checkpointing"] = base + max(activations_no_ckpt, rollout_bytes, vae_decode_bytes)
        out[strategy] = rows
    return out


def objective_names() -> list[str]:
    import objectives

    return list(dict.fromkeys([*objectives.OBJECTIVES, *EXTRA_OBJECTIVES]))


def parse_args(argv=None):
    from train_online_dpo import Config

    c = Config()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="", help="a transformer config.json (default: the real Qwen-Image config)")
    p.add_argument("--world_size", type=int, default=4)
    p.add_argument("--gpu_memory_gb", type=float, default=80.0)
    p.add_argument("--peak_tflops", type=float, default=flop_formula.GPU_PEAK_BF16_TFLOPS["H100 SXM"])
    p.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOP utilisation for the step time")
    p.add_argument("--text_tokens", type=int, default=64, help="prompt tokens after the template (OCR prompts: ~30-60)")
    p.add_argument("--num_prompts", type=int, default=20000, help="distinct prompts in the prompt cache (train + eval)")
    p.add_argument("--pairs_per_prompt", type=int, default=1, help="1 for best_worst, K // 2 for top_bottom")
    for name in ("height", "width", "prompts_per_step", "samples_per_prompt", "num_inference_steps", "micro_batch_pairs",
                 "micro_batch_groups", "lora_rank", "lora_alpha", "rollout_chunk_size", "updates_per_rollout"):
        p.add_argument(f"--{name}", type=int, default=getattr(c, name))
    p.add_argument("--objective", default=c.objective, choices=objective_names(),
                   help="dpo: pairs; the group objectives train whole groups of samples_per_prompt rows")
    p.add_argument("--dgpo_clip_range", type=float, default=c.dgpo_clip_range,
                   help="> 0: dgpo's loss also runs its old (EMA) adapter's forward")
    p.add_argument("--true_cfg_scale", type=float, default=c.true_cfg_scale)
    p.add_argument("--rollout_blocks_run_frac", type=float, default=1.0,
                   help="fraction of block forwards a rollout step cache runs (perf/rollout_blocks_run_frac of a "
                        "run, or benchmarks/bench_rollout_levers.py); 1 = no cache")
    p.add_argument("--negative_text_tokens", type=int, default=8, help="the negative prompt's tokens (true CFG)")
    p.add_argument("--train_mode", default=c.train_mode, choices=("lora", "full"))
    p.add_argument("--lora_targets", default=c.lora_targets)
    p.add_argument("--dtype", default=c.dtype, choices=("bfloat16", "float16", "float32"))
    args = p.parse_args(argv)
    if not 0 < args.rollout_blocks_run_frac <= 1:
        p.error("--rollout_blocks_run_frac must be in (0, 1]")
    if objective_shape(args.objective, args.dgpo_clip_range, args.num_inference_steps)[1] and args.train_mode != "lora":
        p.error(f"--objective {args.objective} keeps an old LoRA adapter: it needs --train_mode lora")
    return args


def plan(args) -> dict:
    from diffusers import AutoencoderKLQwenImage

    config = dict(qi.QWEN_IMAGE_TRANSFORMER_CONFIG)
    if args.config:
        with open(args.config) as f:
            config.update({k: v for k, v in json.load(f).items() if not k.startswith("_")})
    dtype = getattr(torch, args.dtype)
    dtype_bytes = torch.tensor([], dtype=dtype).element_size()
    targets = tuple(t for t in args.lora_targets.split(",") if t)
    transformer = build_meta_transformer(config, args.train_mode, args.lora_rank, args.lora_alpha, targets, dtype)
    params = count_params(transformer)
    image_tokens = flop_formula.image_tokens_for(args.height, args.width)
    group, old, reference, old_forward, passes = objective_shape(args.objective, args.dgpo_clip_range,
                                                                 args.num_inference_steps, args.updates_per_rollout)
    # the smallest training micro-batch: a whole group (K rows) per group of micro_batch_groups, or pairs
    micro = args.samples_per_prompt * args.micro_batch_groups if group else 2 * args.micro_batch_pairs
    cfg = args.true_cfg_scale > 1
    # true CFG: the prompt's and the negative prompt's forwards both keep their tensors for the backward
    saved = saved_activation_bytes(transformer, micro * (2 if cfg else 1), image_tokens, args.text_tokens,
                                   args.height, args.width)
    act_ckpt, act_full = activation_peak_bytes(saved, True), activation_peak_bytes(saved, False)
    # inference working set of one rollout chunk: at most one block's worth of live tensors per sample
    block_per_row = max(saved["per_block"]) / (micro * (2 if cfg else 1))
    rollout_bytes = int(args.rollout_chunk_size * (2 if cfg else 1) * block_per_row)
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage().to(dtype)  # the published Qwen-Image VAE config (VAE_PARAMS parameters)
    vae_decode = vae_decode_peak_bytes(vae, args.rollout_chunk_size, args.height, args.width)  # one chunk at a time
    block_bytes = sum(p.numel() * dtype_bytes for p in transformer.transformer_blocks[0].parameters())
    prompt_cache = args.num_prompts * args.text_tokens * config["joint_attention_dim"] * dtype_bytes
    text_encoder = TEXT_ENCODER_PARAMS * dtype_bytes  # offloaded to the CPU after warming, never freed
    memory = memory_plan(params, act_full, act_ckpt, args.world_size, block_bytes, rollout_bytes,
                         args.train_mode, dtype_bytes, vae_decode, old)

    rank = args.lora_rank if args.train_mode == "lora" else 0
    prompts_per_gpu = args.prompts_per_step // args.world_size
    images_per_gpu = prompts_per_gpu * args.samples_per_prompt
    pairs_per_gpu = prompts_per_gpu * args.pairs_per_prompt * args.updates_per_rollout
    # rows one update trains on: DPO its pairs' chosen and rejected, a group objective every sample
    rows = images_per_gpu if group else 2 * prompts_per_gpu * args.pairs_per_prompt
    negative = args.negative_text_tokens if cfg else None
    fwd = flop_formula.forward_flops(config, image_tokens, args.text_tokens, rank, targets)
    rollout = flop_formula.rollout_flops(config, image_tokens, args.text_tokens, args.num_inference_steps, images_per_gpu,
                                 cfg, rank, targets, negative_text_tokens=args.negative_text_tokens,
                                 blocks_run_frac=args.rollout_blocks_run_frac)
    update = {ck: perf.update_flops(config, image_tokens, [args.text_tokens] * rows, micro, passes,
                                    args.train_mode, rank, targets, ck, reference=reference, old=old_forward,
                                    negative_length=negative) for ck in (True, False)}
    rate = args.peak_tflops * 1e12 * args.mfu
    return dict(
        config=config, world_size=args.world_size, image_tokens=image_tokens, text_tokens=args.text_tokens,
        objective=args.objective, group_objective=group, old_adapter=old, reference_forward=reference,
        old_forward=old_forward,
        micro_batch_rows=micro, true_cfg=cfg,
        params_base=params["base"], params_total=params["total"], params_trainable=params["trainable"],
        memory_gb={s: {k: v / GB for k, v in rows.items()} for s, rows in memory.items()},
        gpu_memory_gb=args.gpu_memory_gb,
        # qwen_image.PromptCache keeps every prompt's embedding in (pinned) CPU memory, in each process,
        # next to the text encoder, moved there after warming the cache
        prompt_cache_host_gb_per_process=prompt_cache / GB, text_encoder_host_gb_per_process=text_encoder / GB,
        host_gb_per_process=(prompt_cache + text_encoder) / GB,
        # the pipeline is loaded whole on every GPU (sharding comes later) and the text encoder sits there
        # while the prompt cache is warmed
        load_time_gb_per_gpu=(params["base"] + TEXT_ENCODER_PARAMS + VAE_PARAMS) * dtype_bytes / GB,
        forward_tflop=fwd / 1e12,
        forward_tflop_without_lora=flop_formula.forward_flops(config, image_tokens, args.text_tokens) / 1e12, rollout_pflop_per_gpu=rollout / 1e15,
        update_pflop_per_gpu_checkpointed=update[True] / 1e15, update_pflop_per_gpu_no_checkpointing=update[False] / 1e15,
        images_per_gpu=images_per_gpu, pairs_per_gpu=pairs_per_gpu if not group else 0,
        update_rows_per_gpu=rows * passes, peak_tflops=args.peak_tflops, mfu=args.mfu,
        num_inference_steps=args.num_inference_steps, rollout_blocks_run_frac=args.rollout_blocks_run_frac,
        predicted_rollout_s=rollout / rate, predicted_update_s_checkpointed=update[True] / rate,
        predicted_step_s_checkpointed=(rollout + update[True]) / rate,
        predicted_step_s_no_checkpointing=(rollout + update[False]) / rate,
    )


def print_plan(result: dict):
    print(f"Qwen-Image transformer: {result['params_base']:,} parameters; {result['params_trainable']:,} trainable")
    print(f"one forward, {result['image_tokens']} image + {result['text_tokens']} text tokens: "
          f"{result['forward_tflop_without_lora']:.2f} TFLOP ({result['forward_tflop']:.2f} with the LoRA adapters)")
    extra = [name for name, on in (("the reference", result["reference_forward"]), ("the old adapter", result["old_forward"]))
             if on]
    unit = "whole groups" if result["group_objective"] else "pairs"
    print(f"objective {result['objective']}: training micro-batch {result['micro_batch_rows']} rows ({unit}"
          f"{', twice for true CFG' if result['true_cfg'] else ''}); forwards per row: the policy"
          f"{''.join(', ' + e for e in extra)}; old adapter memory: {'yes' if result['old_adapter'] else 'none'}")
    print(f"\nper-GPU memory (GB) on {result['world_size']} GPUs of {result['gpu_memory_gb']:.0f} GB:")
    order = list(dict.fromkeys(n for s in ("fsdp2", "ddp") for n in result["memory_gb"][s]))
    print(f"  {'':32s} {'DDP':>9s} {'FSDP2':>9s}")
    for name in order:
        row = [result["memory_gb"][s].get(name) for s in ("ddp", "fsdp2")]
        print(f"  {name:32s} " + " ".join(f"{v:9.2f}" if v is not None else f"{'-':>9s}" for v in row))
    print("  (totals: fixed rows + the largest of the activations, rollout and VAE decode working sets: they take turns)")
    for s in ("ddp", "fsdp2"):
        total = result["memory_gb"][s]["total_checkpointed"]
        verdict = "fits" if total <= 0.95 * result["gpu_memory_gb"] else "does NOT fit"
        print(f"  {s}: {verdict} with gradient checkpointing ({total:.1f} GB); without: "
              f"{result['memory_gb'][s]['total_no_checkpointing']:.1f} GB")
    print(f"  while warming the prompt cache (text encoder on the GPU): {result['load_time_gb_per_gpu']:.1f} GB")
    print(f"host memory per process: {result['host_gb_per_process']:.1f} GB = prompt cache "
          f"{result['prompt_cache_host_gb_per_process']:.1f} GB (--num_prompts x --text_tokens x text width, pinned) "
          f"+ text encoder {result['text_encoder_host_gb_per_process']:.1f} GB (Qwen2.5-VL-7B, offloaded to the CPU); "
          f"{result['world_size']} processes on one node: {result['world_size'] * result['host_gb_per_process']:.0f} GB")
    work = (f"{result['update_rows_per_gpu']} rows updated" if result["group_objective"] else
            f"{result['pairs_per_gpu']} pairs updated")
    print(f"\nper step and GPU: {result['images_per_gpu']} rollout images x {result['num_inference_steps']} steps"
          + (f", {result['rollout_blocks_run_frac']:.0%} of block forwards run (step cache)"
             if result['rollout_blocks_run_frac'] < 1 else "")
          + f" ({result['rollout_pflop_per_gpu']:.1f} PFLOP), "
          f"{work} ({result['update_pflop_per_gpu_checkpointed']:.2f} PFLOP with "
          f"checkpointing, {result['update_pflop_per_gpu_no_checkpointing']:.2f} without)")
    print(f"predicted at {result['mfu']:.0%} MFU of {result['peak_tflops']:.0f} TFLOP/s: rollout "
          f"{result['predicted_rollout_s']:.0f} s + update {result['predicted_update_s_checkpointed']:.1f} s = "
          f"{result['predicted_step_s_checkpointed']:.0f} s per step (reward and VAE decode not included)")


def main(argv=None):
    args = parse_args(argv)
    result = plan(args)
    print_plan(result)
    print(json.dumps({k: v for k, v in result.items() if k != "config"}))
    return result


if __name__ == "__main__":
    main()
