"""Learning per rollout image on the cpu_tiny task: `best_worst` (one pair per prompt group) against
`top_bottom` (floor(K/2) pairs per group) at the same rollout budget (steps x prompts x K images).

    python benchmarks/bench_learning.py [--steps 20] [--seeds 0 1]

Each (strategy, seed) is a full cpu_tiny run of train_online_dpo.py; the seed changes the data
order, rollout seeds and noise (the tiny model stays the same). Gain = final minus initial eval
reward (64 fixed-seed images). Last line: a JSON object with both gains per rollout image and ratio.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run(strategy, seed, steps, workdir):
    import train_online_dpo

    out = os.path.join(workdir, f"{strategy}-{seed}")
    train_online_dpo.main(["--preset", "cpu_tiny", "--output_dir", out, "--pair_strategy", strategy,
                           "--seed", str(seed), "--max_steps", str(steps), "--eval_every", str(steps),
                           "--checkpoint_every", "0", "--sample_grid_every", "0"])
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r["eval/reward_mean"] for r in rows if "eval/reward_mean" in r]
    pairs = sum(r.get("pairs/kept", 0) for r in rows)
    config = train_online_dpo.PRESETS["cpu_tiny"]
    images = steps * config["prompts_per_step"] * config["samples_per_prompt"]
    return {"gain": evals[-1] - evals[0], "images": images, "pairs": pairs}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    args = parser.parse_args()
    results = {"best_worst": [], "top_bottom": []}
    with tempfile.TemporaryDirectory() as workdir:
        for seed in args.seeds:  # interleaved
            for strategy in results:
                results[strategy].append(run(strategy, seed, args.steps, workdir))
    summary = {}
    for strategy, runs in results.items():
        summary[f"{strategy}_gain"] = round(statistics.median(r["gain"] for r in runs), 5)
        summary[f"{strategy}_gain_per_rollout_image"] = statistics.median(r["gain"] / r["images"] for r in runs)
        summary[f"{strategy}_pairs_per_run"] = statistics.median(r["pairs"] for r in runs)
    summary["rollout_images_per_run"] = results["best_worst"][0]["images"]
    summary["top_bottom_over_best_worst"] = round(
        summary["top_bottom_gain_per_rollout_image"] / summary["best_worst_gain_per_rollout_image"], 3)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
