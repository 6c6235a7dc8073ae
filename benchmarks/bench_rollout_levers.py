"""Which cheaper rollouts keep the rollout's reward distribution: on the text world (worlds/text_world,
32x64, PP-OCRv5 reward), one rollout of --prompts prompts x --k samples at fixed seeds with the
trainer's rollout (qwen_image_rollout.rollout, chunks of 32 as in the text_world preset) for each lever: no
cache at the preset's 8 steps, diffusers' First Block Cache at several thresholds (8 steps), and
fewer steps (4, 2) without a cache. Images only, no training: the model is the world's base model
(what the policy is at step 0; LoRA starts as a no-op).

Per variant: the fraction of block forwards run (qwen_image_rollout.counting_block_forwards), the sampling
wall time (variants interleaved, median of --repeats; decode and reward not included), the mean
PP-OCR reward and exact match, the mean within-group reward std (what pairing and advantages see),
and the fraction of images whose reward equals the uncached rollout's.

    OMP_NUM_THREADS=1 python benchmarks/bench_rollout_levers.py [--prompts 8] [--k 8] [--repeats 3]

Last line: a JSON object with every figure.
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

import perf  # noqa: E402
import qwen_image as qi  # noqa: E402
import qwen_image_rollout as qir  # noqa: E402
import evaluation  # noqa: E402
import prompt_data  # noqa: E402
import run_config  # noqa: E402


def variants(steps: int, thresholds: list[float], fewer_steps: list[int]) -> list[tuple[str, int, str]]:
    """(label, steps, cache spec)."""
    out = [(f"none_{steps}steps", steps, "")]
    out += [(f"first_block_{t:g}", steps, f"first_block:{t:g}") for t in thresholds]
    out += [(f"none_{s}steps", s, "") for s in fewer_steps]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", type=int, default=8, help="distinct train prompts (every 12th line: 8 words)")
    parser.add_argument("--k", type=int, default=8, help="samples per prompt")
    parser.add_argument("--steps", type=int, default=8, help="the preset's rollout steps")
    parser.add_argument("--thresholds", default="0.05,0.1,0.2,0.3")
    parser.add_argument("--fewer_steps", default="4,2")
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    from rewards import build_reward

    overrides = run_config.TEXT_WORLD_OVERRIDES
    height, width = overrides["height"], overrides["width"]
    rows = prompt_data.load_prompts(os.path.join(run_config.TEXT_WORLD_DATA, "train.txt"), need_ocr_target=True)
    rows = rows[::max(1, len(rows) // args.prompts)][:args.prompts]
    flat = [row for row in rows for _ in range(args.k)]
    prompts = [row["prompt"] for row in flat]
    seeds = list(range(len(prompts)))
    pipe = qi.load_pipeline(run_config.TEXT_WORLD, dtype=torch.float32)
    cache = qi.PromptCache(pipe, overrides["max_sequence_length"])
    reward_fn = build_reward("ocr")
    layers = len(pipe.transformer.transformer_blocks)
    runs = variants(args.steps, [float(t) for t in args.thresholds.split(",")],
                    [int(s) for s in args.fewer_steps.split(",")])

    times = {label: [] for label, _, _ in runs}
    out = {}
    for repeat in range(args.repeats + 1):  # repeat 0: warm-up, also gives the latents and counts
        for label, steps, spec in runs:
            settings = qir.RolloutSettings(height=height, width=width, num_inference_steps=steps, chunk_size=args.chunk,
                                          cache=spec)
            counts = []
            start = time.perf_counter()
            latents, _ = qir.rollout(pipe, cache, prompts, seeds, settings, decode=False, block_forwards=counts)
            seconds = time.perf_counter() - start
            if repeat:
                times[label].append(seconds)
            else:
                rows_run = -(-len(prompts) // args.chunk) * args.chunk
                out[label] = {"steps": steps, "cache": spec, "latents": latents,
                              # of the block forwards the preset's uncached rollout runs
                              "blocks_run_frac_of_preset": perf.blocks_run_fraction(counts, layers, args.steps * rows_run),
                              "blocks_run_frac": perf.blocks_run_fraction(counts, layers, steps * rows_run)}
    base_label = runs[0][0]
    for label, steps, spec in runs:
        r = out[label]
        images = qi.decode_latents(pipe, r.pop("latents"), height, width)
        scores = torch.tensor(evaluation.score_rows(reward_fn, images, flat), dtype=torch.float64)
        r["rewards"] = scores
        groups = scores.view(len(rows), args.k)
        r.update({"sample_s_median": statistics.median(times[label]), "sample_s_all": [round(t, 3) for t in times[label]],
                  "reward_mean": scores.mean().item(), "reward_se": evaluation.standard_error(scores),
                  "exact_match": evaluation.exact_matches(scores).mean().item(),
                  "group_std_mean": groups.std(dim=1, unbiased=False).mean().item()})
    base = out[base_label]["rewards"]
    for label in out:
        scores = out[label].pop("rewards")
        out[label]["same_reward_as_uncached"] = (scores == base).double().mean().item()
        out[label]["reward_gain_vs_uncached"] = (scores - base).mean().item()
        out[label]["reward_gain_se"] = evaluation.standard_error(scores - base)
        out[label]["time_vs_uncached"] = out[label]["sample_s_median"] / out[base_label]["sample_s_median"]

    print(f"text world, {len(rows)} prompts x {args.k} samples, {height}x{width}, chunks of {args.chunk}, "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'variant':>18s} {'blocks run':>10s} {'sample s':>8s} {'x time':>6s} {'reward':>15s} {'exact':>6s} "
          f"{'grp std':>7s} {'same r':>6s} {'paired gain':>16s}")
    for label, r in out.items():
        print(f"{label:>18s} {r['blocks_run_frac_of_preset']:10.3f} {r['sample_s_median']:8.2f} {r['time_vs_uncached']:6.2f} "
              f"{r['reward_mean']:.4f} ± {r['reward_se']:.4f} {r['exact_match']:6.3f} {r['group_std_mean']:7.4f} "
              f"{r['same_reward_as_uncached']:6.3f} {r['reward_gain_vs_uncached']:+.4f} ± {r['reward_gain_se']:.4f}")
    result = {"prompts": len(rows), "k": args.k, "height": height, "width": width, "chunk": args.chunk,
              "repeats": args.repeats, "variants": out}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
