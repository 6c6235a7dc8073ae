"""Where a text-world run's time goes: per step (rollout, reward, each update pass) and per eval
(sampling vs PP-OCR), from a short real run of the trainer, extrapolated to one run of the
comparison (benchmarks/compare_objectives.py: 40 steps x 64 rollout images, an eval every 10 steps).

    OMP_NUM_THREADS=1 python benchmarks/profile_world.py --objective dpo --steps 4
    OMP_NUM_THREADS=1 python benchmarks/profile_world.py --objective awm --steps 4 -- --updates_per_rollout 1

Everything after `--` goes to train_online_dpo.py as is. The run evaluates at step 0 and at its last
step (192 images each), so each eval phase is measured twice. Times are the trainer's own
(metrics.jsonl: time/rollout_s, time/reward_s, time/update_s, time/eval_sample_s, time/eval_reward_s);
the first step is left out of the per-step medians (warm-up). Say whether the machine was idle
(the load average is printed) when you quote the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

COMPARISON_STEPS, COMPARISON_EVALS = 40, 5  # compare_objectives.py: 40 steps, evals at 0, 10, 20, 30, 40


def profile(run_dir: str) -> dict:
    """Medians of each phase from a run folder's metrics.jsonl, and the comparison run they imply."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "config.json")) as f:
        updates = json.load(f)["updates_per_rollout"]
    steps = [r for r in rows if "time/update_s" in r]
    evals = [r for r in rows if "time/eval_sample_s" in r]
    timed = steps[1:] or steps  # the first step pays one-off costs (allocations, onnxruntime warm-up)
    phase = {key: statistics.median(r[key] for r in timed) for key in ("time/rollout_s", "time/reward_s", "time/update_s")}
    phase["time/update_pass_s"] = phase["time/update_s"] / updates
    for key in ("time/eval_sample_s", "time/eval_reward_s"):
        phase[key] = statistics.median(r[key] for r in evals) if evals else 0.0
    step_s = phase["time/rollout_s"] + phase["time/reward_s"] + phase["time/update_s"]
    eval_s = phase["time/eval_sample_s"] + phase["time/eval_reward_s"]
    total = COMPARISON_STEPS * step_s + COMPARISON_EVALS * eval_s
    shares = {"rollout": COMPARISON_STEPS * phase["time/rollout_s"], "reward": COMPARISON_STEPS * phase["time/reward_s"],
              "update": COMPARISON_STEPS * phase["time/update_s"],
              "eval sampling": COMPARISON_EVALS * phase["time/eval_sample_s"],
              "eval reward": COMPARISON_EVALS * phase["time/eval_reward_s"]}
    return {"phase_s": phase, "updates_per_rollout": updates, "comparison_run_s": total,
            "comparison_share": {k: v / total for k, v in shares.items()}, "steps_timed": len(timed), "evals_timed": len(evals)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--objective", default="dpo", help="the trainer's --objective")
    parser.add_argument("--steps", type=int, default=4, help="training steps of the profiled run (>= 2: the first is warm-up)")
    parser.add_argument("--run_dir", default="", help="summarise this finished run folder instead of running one")
    parser.add_argument("--json", default="", help="also write the profile to this file")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.steps < 2:
        parser.error("--steps must be >= 2 (the first step is warm-up)")
    run_dir = args.run_dir
    if not run_dir:
        import train_online_dpo

        run_dir = tempfile.mkdtemp(prefix="profile-world-")
        started = time.perf_counter()
        train_online_dpo.main(["--preset", "text_world", "--objective", args.objective, "--max_steps", str(args.steps),
                               "--eval_every", str(args.steps), "--checkpoint_every", "0", "--sample_grid_every", "0",
                               "--output_dir", run_dir, *extra])
        print(f"profiled run: {time.perf_counter() - started:.1f} s wall in {run_dir}")
    result = profile(run_dir)
    result.update(objective=args.objective, extra=extra, load_average=os.getloadavg())
    print(f"load average {result['load_average'][0]:.2f}; per step (median of {result['steps_timed']}) and per eval:")
    for key, value in result["phase_s"].items():
        print(f"  {key:22s} {value:8.2f} s")
    print(f"one comparison run ({COMPARISON_STEPS} steps, {COMPARISON_EVALS} evals): {result['comparison_run_s']:.0f} s, of which")
    for key, share in result["comparison_share"].items():
        print(f"  {key:14s} {100 * share:5.1f} %")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
