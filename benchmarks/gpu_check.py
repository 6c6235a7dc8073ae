"""Real-size check on one GPU, no download: the Qwen-Image transformer at its real size with random
bf16 weights, the tiny VAE, and random prompt embeddings of the real text width (3584) fed straight to
the pipeline (`prompt_embeds`), so no text encoder is needed at all. Measures, and writes to --out:

- rollout images/s at 512x512, 35 steps, `--images` per pipeline call, for every attention backend
  usable here (perf.available_attention_backends(); the slow reference paths _native_math and flex
  without compile are skipped), eager, then with regional torch.compile (native backend);
- the LoRA DPO update (recipe LoRA rank 64 on the 12 targets, gradient checkpointing): seconds per
  pair with the reference pass (reference forward with adapters off, policy forward + backward,
  AdamW step);
- cheaper rollouts (eager, native backend): the same rollout under --rollout_cache (diffusers' step
  cache, as train_online_dpo's rollout_cache runs it; the fraction of block forwards run is counted,
  and the FLOPs count only those) and with --short_steps steps instead of --steps. The weights are
  random, so a threshold cache skips as it would on noise: its timing per block forward run is what
  carries over, not its skip fraction;
- peak memory, achieved TFLOP/s (flop_formula.py's formula) and MFU against --peak_tflops.

    python benchmarks/gpu_check.py --peak_tflops 989 --out gpu_check.json        # H100 SXM, < 8 min
    python benchmarks/gpu_check.py --tiny                                         # CPU, the same code end to end

It stops starting new phases after --budget_s seconds and writes the JSON after every phase, so a
slow machine still leaves its figures. The weights are random: the images are noise, only the
timings and memory mean anything. Last line: the JSON.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import flop_formula  # noqa: E402
import perf  # noqa: E402
import qwen_image as qi  # noqa: E402
import qwen_image_rollout as qir  # noqa: E402

SKIPPED_BACKENDS = ("_native_math", "flex")  # reference paths: minutes per rollout at real size


def build(tiny: bool, device: str, dtype: torch.dtype):
    """(pipeline, transformer config dict, text width): the tiny pipeline's VAE and scheduler with
    either its own transformer (--tiny) or the real-size one with random weights."""
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel

    tiny_pipe = qi.build_tiny_pipeline(seed=0)
    if tiny:
        transformer = tiny_pipe.transformer
    else:
        with torch.device("meta"):  # no 80 GB fp32 initialisation: allocate bf16 on the GPU, then fill
            transformer = QwenImageTransformer2DModel(**qi.QWEN_IMAGE_TRANSFORMER_CONFIG).to(dtype)
        transformer = transformer.to_empty(device=device)
        # RoPE tables are plain attributes (not buffers), so they stayed on meta: rebuild them
        rope = transformer.pos_embed
        transformer.pos_embed = type(rope)(theta=rope.theta, axes_dim=list(rope.axes_dim), scale_rope=rope.scale_rope)
        generator = torch.Generator(device).manual_seed(0)
        with torch.no_grad():
            for name, p in transformer.named_parameters():  # small random weights: timings only
                if p.ndim >= 2:
                    p.normal_(0.0, 0.02, generator=generator)
                else:
                    p.fill_(1.0 if "norm" in name else 0.0)
    pipe = QwenImagePipeline(scheduler=tiny_pipe.scheduler, vae=tiny_pipe.vae, text_encoder=tiny_pipe.text_encoder,
                             tokenizer=tiny_pipe.tokenizer, transformer=transformer)
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe, dict(transformer.config), transformer.config.joint_attention_dim


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="tiny model on CPU: the same code end to end")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--peak_tflops", type=float, default=0.0, help="dense bf16 peak of the card (docs/performance.md)")
    parser.add_argument("--size", type=int, default=None, help="default 512 (64 with --tiny)")
    parser.add_argument("--steps", type=int, default=None, help="default 35 (4 with --tiny)")
    parser.add_argument("--images", type=int, default=4, help="images per pipeline call")
    parser.add_argument("--text_tokens", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=2, help="DPO pairs timed (one per micro-batch)")
    parser.add_argument("--budget_s", type=float, default=420.0, help="no new phase starts after this")
    parser.add_argument("--no_compile", action="store_true")
    parser.add_argument("--rollout_cache", default="first_block:0.1", help="step cache timed ('' skips the case)")
    parser.add_argument("--short_steps", type=int, default=None, help="the shorter rollout's steps; default 20 (2 with --tiny)")
    args = parser.parse_args(argv)

    begin = time.perf_counter()
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if cuda else torch.float32
    size = args.size or (64 if args.tiny else 512)
    steps = args.steps or (4 if args.tiny else 35)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    result = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "tiny": args.tiny,
              "size": size, "steps": steps, "images_per_call": args.images, "text_tokens": args.text_tokens,
              "dtype": str(dtype), "peak_tflops": args.peak_tflops, "rollout": {}, "notes": []}

    def save():
        result["elapsed_s"] = round(time.perf_counter() - begin, 1)
        if cuda:
            result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 1e9
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    def over_budget(phase, reserve_s=0.0):
        """True (and noted) when `phase`, expected to take reserve_s, would start after the budget."""
        if time.perf_counter() - begin > args.budget_s - reserve_s:
            result["notes"].append(f"skipped {phase}: over --budget_s")
            return True
        return False

    pipe, model_config, text_width = build(args.tiny, device, dtype)
    transformer = pipe.transformer
    lora_rank, targets = 64 if not args.tiny else 8, qi.RECIPE_LORA_TARGETS
    params = qi.add_lora(transformer, lora_rank, 2 * lora_rank, targets)  # the policy samples with its adapters
    for p in params:
        p.data = p.data.float()
    result["build_s"] = round(time.perf_counter() - begin, 1)
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(args.images, args.text_tokens, text_width, generator=generator).to(device, dtype)
    mask = torch.ones(args.images, args.text_tokens, dtype=torch.long, device=device)  # equal lengths: no padding
    image_tokens = flop_formula.image_tokens_for(size, size)
    rollout_flops = flop_formula.rollout_flops(model_config, image_tokens, args.text_tokens, steps, args.images,
                                       lora_rank=lora_rank, lora_targets=targets)

    def rollout(num_steps=steps):
        generators = [torch.Generator().manual_seed(i) for i in range(args.images)]
        return pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, height=size, width=size, num_inference_steps=num_steps,
                    true_cfg_scale=1.0, generator=generators, output_type="latent", return_dict=False)[0]

    def timed(fn, repeats=1):
        times, out = [], None
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times), out

    def record(name, seconds, flops=None):
        flops = rollout_flops if flops is None else flops
        achieved = flop_formula.throughput(flops, seconds, args.peak_tflops)
        result["rollout"][name] = {"seconds": round(seconds, 3), "images_per_s": round(args.images / seconds, 3),
                                   "tflops_per_s": float(f"{achieved['tflops_per_device']:.4g}"),  # 4 significant digits: the tiny CPU model runs at ~1e-4
                                   **({"mfu": round(achieved["mfu"], 4)} if "mfu" in achieved else {})}
        print(f"rollout {name}: {args.images / seconds:.3f} images/s, {achieved['tflops_per_device']:.1f} TFLOP/s", flush=True)
        save()

    # 1. eager rollout, every usable attention backend (native first: it is the reference)
    backends = ["native"] + [b for b in perf.available_attention_backends() if b not in SKIPPED_BACKENDS + ("native",)]
    reference_latents = None
    for backend in backends:
        if over_budget(f"rollout {backend}"):
            break
        try:
            perf.set_attention_backend(transformer, backend)
            timed(rollout)  # warm-up
            seconds, latents = timed(rollout)
        except Exception as error:  # a backend that refuses these shapes / dtypes: note it, go on
            result["notes"].append(f"backend {backend}: {type(error).__name__}: {str(error)[:200]}")
            continue
        if backend == "native":
            reference_latents = latents.float()
        else:
            result.setdefault("backend_max_abs_diff_vs_native", {})[backend] = float((latents.float() - reference_latents).abs().max())
        record(f"eager_{backend}", seconds)
    perf.set_attention_backend(transformer, "native")

    # 1b. cheaper rollouts: a step cache (diffusers hooks, as the trainer's rollout_cache), and fewer steps
    short_steps = args.short_steps or (2 if args.tiny else 20)
    if args.rollout_cache and not over_budget(f"rollout cache {args.rollout_cache}"):
        counts = {}

        def cached_rollout():
            counts.clear()
            with qir.counting_block_forwards(transformer, counts), qir.rollout_cache(transformer, args.rollout_cache):
                return rollout()

        timed(cached_rollout)  # warm-up
        seconds, latents = timed(cached_rollout)
        layers = len(transformer.transformer_blocks)
        flops = perf.rollout_step_flops(model_config, image_tokens, [args.text_tokens] * args.images, args.images, steps,
                                        lora_rank=lora_rank, lora_targets=targets, block_forwards=[dict(counts)])
        name = "eager_native_cache_" + args.rollout_cache.replace(":", "_").replace(",", "_")
        record(name, seconds, flops)
        result["rollout"][name]["blocks_run_frac"] = perf.blocks_run_fraction([counts], layers, steps * args.images)
        if reference_latents is not None:
            result["rollout"][name]["max_abs_diff_vs_uncached"] = float((latents.float() - reference_latents).abs().max())
        save()
    if short_steps != steps and not over_budget(f"rollout {short_steps} steps"):
        timed(lambda: rollout(short_steps))  # warm-up (another scheduler schedule)
        seconds, _ = timed(lambda: rollout(short_steps))
        record(f"eager_native_{short_steps}_steps", seconds, rollout_flops * short_steps // steps)

    # 2. the LoRA DPO update, eager: reference forward (adapters off) + policy forward/backward + AdamW
    def dpo_update_phase(label):
        import dpo_loss

        optimizer = torch.optim.AdamW(params, lr=1e-6)
        x0 = torch.randn(2, image_tokens, 64, generator=generator).to(device)
        noise = torch.randn(2, image_tokens, 64, generator=generator).to(device)
        sigmas = torch.tensor([0.5, 0.5], device=device)
        pair_embeds = embeds[:1].expand(2, -1, -1)

        def one_pair():
            x_s = dpo_loss.noisy_latents(x0, noise, sigmas)
            with torch.no_grad(), qi.lora_disabled(transformer):
                ref = qi.predict_velocity(transformer, x_s, sigmas, pair_embeds, None, size, size)
            pred = qi.predict_velocity(transformer, x_s, sigmas, pair_embeds, None, size, size)
            loss, _ = dpo_loss.diffusion_dpo_loss(pred, ref, dpo_loss.velocity_target(x0, noise), 100.0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        timed(one_pair)  # warm-up (and AdamW state)
        seconds, _ = timed(one_pair, repeats=args.pairs)
        flops = perf.dpo_update_flops(model_config, image_tokens, args.text_tokens, 1, "lora", lora_rank, targets, True)
        achieved = flop_formula.throughput(flops, seconds, args.peak_tflops)
        result[f"dpo_update_{label}"] = {"seconds_per_pair": round(seconds, 3),
                                         "tflops_per_s": float(f"{achieved['tflops_per_device']:.4g}"),  # 4 significant digits: the tiny CPU model runs at ~1e-4
                                         **({"mfu": round(achieved["mfu"], 4)} if "mfu" in achieved else {})}
        print(f"DPO update {label}: {seconds:.3f} s per pair, {achieved['tflops_per_device']:.1f} TFLOP/s", flush=True)
        save()

    transformer.enable_gradient_checkpointing()
    if not over_budget("dpo update eager"):
        dpo_update_phase("eager")

    # 3. regional compile (native backend): rollout, then the update if time is left
    if not args.no_compile and not over_budget("compile", reserve_s=120):
        counter = perf.CompileCounter()
        perf.compile_transformer_blocks(transformer, "inductor")
        start = time.perf_counter()
        timed(rollout)
        result["compile_warm_up_s"] = round(time.perf_counter() - start, 1)
        result["compiled_graphs_in_warm_up"] = counter.new()
        seconds, latents = timed(rollout)
        result["compiled_new_graphs_after_warm_up"] = counter.new()  # 0: no recompiles across steps
        if reference_latents is not None:
            result["compiled_max_abs_diff_vs_eager"] = float((latents.float() - reference_latents).abs().max())
        record("compiled_native", seconds)
        if not over_budget("dpo update compiled", reserve_s=180):  # two more compiles (grad, adapters off)
            dpo_update_phase("compiled")
    save()
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
