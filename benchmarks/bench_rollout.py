"""The project's rollout (qwen_image_rollout.rollout: cached prompt embeddings, per-sample generators, the
pipeline's own sampler, decode) against the bare QwenImagePipeline.__call__ with the same prompts,
seeds, steps and size, both returning PIL images.

    python benchmarks/bench_rollout.py [--model tiny-bench] [--prompts 2] [--k 8] [--size 128] [--steps 8]

Variants interleaved; medians of --repeats. Last line: a JSON object with rollout_over_pipeline_time.
"""

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-bench")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import torch

    import qwen_image as qi
    import qwen_image_rollout as qir

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    pipe = qi.load_pipeline(args.model, dtype=torch.bfloat16 if cuda else torch.float32, device=device)
    prompts = [f'A poster that says "Benchmark {i}" on a wall' for i in range(args.prompts)]
    flat = [p for p in prompts for _ in range(args.k)]
    seeds = list(range(len(flat)))
    n = len(flat)
    settings = qir.RolloutSettings(height=args.size, width=args.size, num_inference_steps=args.steps, chunk_size=n)
    cache = qi.PromptCache(pipe, 256)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def ours():
        return qir.rollout(pipe, cache, flat, seeds, settings)[1]

    def bare():
        # the diffusers call as a user writes it: prompts, one generator per image, PIL output
        return pipe(prompt=flat, height=args.size, width=args.size, num_inference_steps=args.steps,
                    true_cfg_scale=1.0, max_sequence_length=256,
                    generator=[torch.Generator().manual_seed(s) for s in seeds]).images

    variants = {"rollout": ours, "pipeline": bare}
    for fn in variants.values():  # warm-up (and the prompt cache is filled once, as in training)
        fn()
    times = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            sync()
            start = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({"model": args.model, "images": n, "size": args.size, "steps": args.steps, "device": device,
                      "rollout_s": round(med["rollout"], 4), "pipeline_s": round(med["pipeline"], 4),
                      "rollout_images_per_s": round(n / med["rollout"], 2),
                      "rollout_over_pipeline_time": round(med["rollout"] / med["pipeline"], 3)}))


if __name__ == "__main__":
    main()
