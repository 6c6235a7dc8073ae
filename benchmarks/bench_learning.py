"""Learning per rollout image and per second: every online objective at the same rollout budget
(steps x prompts x K images), each tuned by a small sweep of its main knob, over several seeds.

    python benchmarks/bench_learning.py [--preset text_world] [--steps 40] [--seeds 0 1 2]
                                        [--variants best_worst top_bottom dgpo nft awm] [--no_sweep]
                                        [--knob dgpo=10 ...]  (a variant's knob value: no sweep for it)

The preset: `text_world` (default: the shipped tiny text world, PP-OCRv5 reward, gains in eval
exact match) or `cpu_tiny` (the random tiny model, brightness reward). Variants: `best_worst` and `top_bottom` (Diffusion-DPO, one pair per group / floor(K/2) pairs per
group), `dgpo`, `nft`, `awm`. Sweep (the same budget for every variant with a knob): each value of
the variant's main knob (KNOBS) on the first seed; the value with the largest eval gain is then run
on the other seeds (the first seed's run is reused). Each run is a full train_online_dpo.py run; the
seed changes the data order, rollout seeds and noise (the model stays the same). Gain = final minus
initial eval (fixed eval seeds): reward mean, and OCR exact match when the reward is an OCR one.
Reported per variant: mean and standard error over seeds of the gain, the gain per rollout image and
per second of training (rollouts, rewards, updates; not the evals), and the difference to best_worst
with its standard error (Welch; significant when beyond 2 standard errors). Last line: a JSON object
with everything and the ratios of each variant's gain per image / per second to best_worst's.
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

VARIANTS = {
    "best_worst": ["--objective", "dpo", "--pair_strategy", "best_worst"],
    "top_bottom": ["--objective", "dpo", "--pair_strategy", "top_bottom"],
    "dgpo": ["--objective", "dgpo"],
    "nft": ["--objective", "nft"],
    "awm": ["--objective", "awm"],
}
# each variant's main knob and the values swept (3 each: the same budget for every method)
KNOBS = {
    "best_worst": ("beta", [30.0, 100.0, 300.0]),
    "top_bottom": ("beta", [30.0, 100.0, 300.0]),
    "dgpo": ("dgpo_beta", [10.0, 30.0, 100.0]),
    "nft": ("nft_beta", [0.1, 0.3, 1.0]),
    "awm": ("awm_old_kl_weight", [0.01, 0.1, 1.0]),
}


def run(variant, seed, steps, preset, workdir, knob=None, extra=()):
    import train_online_dpo

    args = list(VARIANTS[variant])
    if knob is not None:
        args += [f"--{knob[0]}", str(knob[1])]
    name = f"{variant}-{seed}" + (f"-{knob[0]}{knob[1]}" if knob else "")
    out = os.path.join(workdir, name)
    start = time.perf_counter()
    train_online_dpo.main(["--preset", preset, "--output_dir", out, "--seed", str(seed), "--max_steps", str(steps),
                           "--eval_every", str(steps), "--checkpoint_every", "0", "--sample_grid_every", "0",
                           *args, *extra])
    wall = time.perf_counter() - start
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r for r in rows if "eval/reward_mean" in r]
    train_seconds = sum(r.get("time/rollout_s", 0) + r.get("time/reward_s", 0) + r.get("time/update_s", 0) for r in rows)
    config = json.load(open(os.path.join(out, "config.json")))
    images = steps * config["prompts_per_step"] * config["samples_per_prompt"]
    result = {"variant": variant, "seed": seed, "knob": list(knob) if knob else None,
              "reward_gain": evals[-1]["eval/reward_mean"] - evals[0]["eval/reward_mean"],
              "final_reward": evals[-1]["eval/reward_mean"], "images": images, "train_seconds": train_seconds,
              "wall_seconds": wall}
    if "eval/reward_gain_se" in evals[-1]:  # this run's own eval noise: paired image by image with step 0
        result["reward_gain_paired_se"] = evals[-1]["eval/reward_gain_se"]
    if "eval/exact_match" in evals[0]:
        result["exact_match_gain"] = evals[-1]["eval/exact_match"] - evals[0]["eval/exact_match"]
        result["final_exact_match"] = evals[-1]["eval/exact_match"]
        if "eval/exact_match_gain_se" in evals[-1]:
            result["exact_match_gain_paired_se"] = evals[-1]["eval/exact_match_gain_se"]
    print(json.dumps(result), flush=True)
    return result


def mean_se(values):
    values = list(values)
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


def score(result):
    """What the sweep maximises: exact-match gain when measured, else reward gain."""
    return result.get("exact_match_gain", result["reward_gain"])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="text_world", choices=["text_world", "cpu_tiny"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no_sweep", action="store_true", help="every variant at its defaults")
    parser.add_argument("--knob", nargs="+", default=[], metavar="VARIANT=VALUE",
                        help="run VARIANT at this value of its main knob instead of sweeping it")
    parser.add_argument("--results", nargs="+", default=[], metavar="LOG",
                        help="run nothing: summarise the per-run JSON lines of earlier bench logs (e.g. seeds run "
                             "as parallel 1-thread processes, or on several machines); the last line per "
                             "(variant, seed) counts, --variants / --knob must match the runs")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run")
    args = parser.parse_args()
    sweep, chosen, runs = {}, {}, {v: [] for v in args.variants}
    given = {v: float(x) for v, x in (item.split("=") for item in args.knob)}
    if args.results:
        found = {}
        for path in args.results:
            with open(path) as f:
                for line in f:
                    row = json.loads(line) if line.startswith('{"variant"') else None
                    if row and row["variant"] in runs:
                        found[(row["variant"], row["seed"])] = row
        for (variant, seed), row in sorted(found.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            runs[variant].append(row)
            chosen[variant] = tuple(row["knob"]) if row["knob"] else None
        args.seeds = sorted({seed for _, seed in found})
        args.variants = [v for v in args.variants if runs[v]]
        runs = {v: runs[v] for v in args.variants}
        print(json.dumps(summarise(args, runs, chosen, sweep)))
        return
    with tempfile.TemporaryDirectory() as workdir:
        for variant in args.variants:  # the sweep, on the first seed
            if variant in given:
                chosen[variant] = (KNOBS[variant][0], given[variant])
                continue
            if args.no_sweep or variant not in KNOBS:
                chosen[variant] = None
                continue
            field, values = KNOBS[variant]
            sweep[variant] = [run(variant, args.seeds[0], args.steps, args.preset, workdir, (field, v), args.extra)
                              for v in values]
            best = max(sweep[variant], key=score)
            chosen[variant] = (field, best["knob"][1])
            runs[variant].append(best)
        for seed in args.seeds:  # the chosen setting on every seed, variants interleaved
            for variant in args.variants:
                if any(r["seed"] == seed for r in runs[variant]):
                    continue
                runs[variant].append(run(variant, seed, args.steps, args.preset, workdir, chosen[variant], args.extra))
    print(json.dumps(summarise(args, runs, chosen, sweep)))


def summarise(args, runs: dict, chosen: dict, sweep: dict) -> dict:
    """Per variant: mean and standard error over seeds of each gain, gain per rollout image and per
    training second, and the differences to best_worst (Welch) with their significance."""
    summary = {"preset": args.preset, "steps": args.steps, "seeds": args.seeds,
               "rollout_images_per_run": runs[args.variants[0]][0]["images"],
               "knobs": {v: list(k) if k else None for v, k in chosen.items()},
               "sweep": {v: [{"value": r["knob"][1], "reward_gain": round(r["reward_gain"], 5),
                              **({"exact_match_gain": round(r["exact_match_gain"], 4)} if "exact_match_gain" in r else {})}
                             for r in results] for v, results in sweep.items()}}
    for variant, results in runs.items():
        for key in ("reward_gain", "exact_match_gain", "final_exact_match"):
            if key in results[0]:
                mean, se = mean_se(r[key] for r in results)
                summary[f"{variant}/{key}"], summary[f"{variant}/{key}_se"] = round(mean, 5), round(se, 5)
        main_gain = "exact_match_gain" if "exact_match_gain" in results[0] else "reward_gain"
        summary[f"{variant}/gain_per_rollout_image"] = statistics.fmean(r[main_gain] / r["images"] for r in results)
        summary[f"{variant}/gain_per_train_second"] = statistics.fmean(r[main_gain] / r["train_seconds"] for r in results)
        summary[f"{variant}/train_seconds"] = round(statistics.fmean(r["train_seconds"] for r in results), 1)
    if "best_worst" in runs:
        for variant in runs:
            for per in ("gain_per_rollout_image", "gain_per_train_second"):
                base = summary[f"best_worst/{per}"]
                summary[f"{variant}/{per}_over_best_worst"] = round(summary[f"{variant}/{per}"] / base, 3) if base else None
            if variant == "best_worst":
                continue
            for key in ("reward_gain", "exact_match_gain"):  # the difference, its standard error (Welch)
                if key in runs[variant][0]:
                    (ma, sa), (mb, sb) = mean_se(r[key] for r in runs["best_worst"]), mean_se(r[key] for r in runs[variant])
                    diff, se = mb - ma, math.sqrt(sa ** 2 + sb ** 2)
                    summary[f"{variant}_minus_best_worst/{key}"] = round(diff, 5)
                    summary[f"{variant}_minus_best_worst/{key}_se"] = round(se, 5)
                    summary[f"{variant}_minus_best_worst/{key}_significant"] = bool(abs(diff) > 2 * se)
    return summary


if __name__ == "__main__":
    main()
