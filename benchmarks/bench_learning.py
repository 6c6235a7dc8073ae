"""How much online DPO learns on the text world (worlds/text_world, PP-OCRv5 reward), per rollout
image and per second of wall time, for a list of VARIANTS (extra trainer flags), over several seeds.

    python benchmarks/bench_learning.py [--steps 30] [--seeds 0 1 2] [--variants best_worst top_bottom]

Each (variant, seed) is a full `--preset text_world` run of train_online_dpo.py; the seed changes
the data order, rollout seeds and noise (the world stays the same). Gain = final minus initial eval
(exact match and mean reward over the preset's fixed-seed eval images). Reported per variant: mean
gain over seeds +- its standard error, gain per rollout image and per second; for each variant after
the first, the difference to the first with its standard error (Welch) and whether it is
significant (|difference| > 2 standard errors). Last line: one JSON object.

To compare a new objective, add an entry to VARIANTS: a name and the flags that select it.
"""

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PRESET = "text_world"
# name -> extra train_online_dpo.py flags. best_worst: one pair per prompt group; top_bottom:
# floor(K/2) pairs per group, at the same rollout budget.
VARIANTS = {
    "best_worst": ["--pair_strategy", "best_worst"],
    "top_bottom": ["--pair_strategy", "top_bottom"],
}


def run(variant: str, seed: int, steps: int, workdir: str) -> dict:
    import train_online_dpo

    out = os.path.join(workdir, f"{variant}-{seed}")
    start = time.perf_counter()
    train_online_dpo.main(["--preset", PRESET, "--output_dir", out, "--seed", str(seed), "--max_steps", str(steps),
                           "--eval_every", str(steps), "--checkpoint_every", "0", "--sample_grid_every", "0",
                           *VARIANTS[variant]])
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/exact_match" in r]
    config = train_online_dpo.PRESETS[PRESET]
    images = steps * config["prompts_per_step"] * config["samples_per_prompt"]
    return {"exact_gain": evals[-1]["eval/exact_match"] - evals[0]["eval/exact_match"],
            "reward_gain": evals[-1]["eval/reward_mean"] - evals[0]["eval/reward_mean"],
            "exact_before": evals[0]["eval/exact_match"], "eval_sem": evals[0]["eval/exact_match_se"],
            "images": images, "wall_s": wall, "pairs": sum(r.get("pairs/kept", 0) for r in rows)}


def mean_sem(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    sem = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, sem


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    results = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory() as workdir:
        for seed in args.seeds:  # interleaved: slow drifts of the machine hit every variant alike
            for variant in args.variants:
                results[variant].append(run(variant, seed, args.steps, workdir))
                print(variant, seed, json.dumps(results[variant][-1]), flush=True)
    summary = {"preset": PRESET, "steps": args.steps, "seeds": args.seeds,
               "rollout_images_per_run": results[args.variants[0]][0]["images"]}
    for variant, runs in results.items():
        for metric in ("exact_gain", "reward_gain"):
            mean, sem = mean_sem([r[metric] for r in runs])
            summary[f"{variant}/{metric}"] = round(mean, 4)
            summary[f"{variant}/{metric}_sem"] = round(sem, 4)
            summary[f"{variant}/{metric}_per_1k_images"] = round(1000 * mean / runs[0]["images"], 4)
            summary[f"{variant}/{metric}_per_100s"] = round(100 * mean / statistics.fmean(r["wall_s"] for r in runs), 4)
        summary[f"{variant}/wall_s"] = round(statistics.fmean(r["wall_s"] for r in runs), 1)
        summary[f"{variant}/pairs_per_run"] = statistics.fmean(r["pairs"] for r in runs)
    reference = args.variants[0]
    for variant in args.variants[1:]:
        for metric in ("exact_gain", "reward_gain"):
            a = [r[metric] for r in results[reference]]
            b = [r[metric] for r in results[variant]]
            (ma, sa), (mb, sb) = mean_sem(a), mean_sem(b)
            diff, se = mb - ma, math.sqrt(sa ** 2 + sb ** 2)
            summary[f"{variant}_minus_{reference}/{metric}"] = round(diff, 4)
            summary[f"{variant}_minus_{reference}/{metric}_se"] = round(se, 4)
            summary[f"{variant}_minus_{reference}/{metric}_significant"] = bool(abs(diff) > 2 * se)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
