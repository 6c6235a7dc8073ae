"""Every online objective at an equal rollout budget on the text world: the project's headline table.

    python benchmarks/compare_objectives.py --workdir outputs/compare --seeds 0 1 2 3 4 --jobs 2 \
        --archive docs/results/compare_objectives.jsonl
    python benchmarks/compare_objectives.py --workdir outputs/compare --seeds 0 1 2 3 4 --summary_only \
        --archive docs/results/compare_objectives.jsonl --plot docs/img/compare_objectives.png

Each run is a full `train_online_dpo.py --preset text_world` run (the same base model, prompts, rollout
budget and eval for every objective; the seed changes the data order, the rollout seeds and the
noise), each objective at its main knob (KNOBS: the value its sweep chose; `--sweep` re-runs the
sweep on the first seed). Runs are separate processes with OMP_NUM_THREADS=1, `--jobs` at a time, in
seed-major order so that an interrupted comparison has whole seeds; a run whose metrics.jsonl already
holds its final eval is not run again (the command resumes). All runs take the first run's step-0
eval (`--eval_baseline`): one base model, one baseline.

Reported per objective (mean and standard error over seeds): the exact-match and reward gains at
the last eval, the final exact match, the mean gain per mean rollout image, rollout TFLOP and update
TFLOP (the trainer's own FLOP accounting, perf/*), per rollout second and per training second
(rollout + reward + update, not the evals); collapse (an eval whose exact match is more than 2 paired standard errors below the
start: the first such step); and, against `grpo` when it is in the table, how many times fewer
rollout images the objective needs to reach GRPO's final mean exact match (linear interpolation on
the seed-mean curve; "not reached" otherwise). `--plot` writes exact match vs rollout images with a
standard-error band per objective.

`--archive FILE` keeps every finished run's result (its curve and totals, one JSON line per run, keyed
by variant, seed, knob, steps and extra flags; written as each run ends, and an archived run is not
run again) and summarises the archive's runs together with
the workdir's: a comparison that takes several sessions or machines accumulates seeds in the file
(docs/results/compare_objectives.jsonl is the project's) instead of in run folders that may be lost.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "best_worst": ["--objective", "dpo", "--pair_strategy", "best_worst"],
    "top_bottom": ["--objective", "dpo", "--pair_strategy", "top_bottom"],
    "dgpo": ["--objective", "dgpo"],
    "nft": ["--objective", "nft"],
    "awm": ["--objective", "awm"],
    # Flow-GRPO-Fast (SDE on the first 2 of 8 steps, both trained, 2 updates per rollout): the default (7
    # trained steps x 4 updates) costs ~7x nft's update on the world (perf/update_tflop)
    "grpo": ["--objective", "grpo", "--grpo_sde_window", "0,2", "--grpo_timestep_fraction", "1",
             "--updates_per_rollout", "2"],
}
# the cheaper rollouts (issue: learning per rollout FLOP) and the deviations from the official algorithms
# kept as options, each on a base variant at its knob: (base, extra flags); opt in with --variants
DERIVED = {
    "top_bottom_steps4": ("top_bottom", ["--num_inference_steps", "4"]),
    "top_bottom_steps2": ("top_bottom", ["--num_inference_steps", "2"]),
    "top_bottom_fbc1": ("top_bottom", ["--rollout_cache", "first_block:1.0"]),
    "awm_steps4": ("awm", ["--num_inference_steps", "4"]),
    "awm_steps2": ("awm", ["--num_inference_steps", "2"]),
    "awm_fbc1": ("awm", ["--rollout_cache", "first_block:1.0"]),
    "awm_group_std": ("awm", ["--advantage_std", "group"]),
    "awm_drop_tied": ("awm", ["--drop_tied_groups", "true"]),
    "nft_group_std": ("nft", ["--advantage_std", "group"]),
    "nft_drop_tied": ("nft", ["--drop_tied_groups", "true"]),
    "dgpo_exact_gradient": ("dgpo", ["--dgpo_exact_gradient", "true"]),
}
for _name, (_base, _flags) in DERIVED.items():
    VARIANTS[_name] = VARIANTS[_base] + _flags
# each objective's main knob: the value used, then the values a sweep tries (on the first seed)
KNOBS = {
    "best_worst": ("beta", 100.0, [30.0, 100.0, 300.0]),
    "top_bottom": ("beta", 100.0, [30.0, 100.0, 300.0]),
    # dgpo and grpo: the values their seed-0 sweeps chose (docs/objectives.md): dgpo_beta 10 collapsed at step
    # 20 and grpo's learning rate 3e-3 at step 30; dgpo_beta 100 is the top of the swept range
    "dgpo": ("dgpo_beta", 100.0, [10.0, 30.0, 100.0]),
    "nft": ("nft_beta", 0.1, [0.1, 0.3, 1.0]),
    "awm": ("awm_old_kl_weight", 0.01, [0.01, 0.1, 1.0]),
    "grpo": ("learning_rate", 1e-3, [5e-4, 1e-3, 3e-3]),
}
for _name, (_base, _flags) in DERIVED.items():
    KNOBS[_name] = KNOBS[_base]
PRESET = "top_bottom"  # the text_world preset's objective: the others are compared with it
CORE = ["best_worst", "top_bottom", "dgpo", "nft", "awm", "grpo"]


def run_name(variant: str, seed: int, knob: tuple[str, float]) -> str:
    return f"{variant}-s{seed}-{knob[0]}{knob[1]:g}"


def command(variant, seed, knob, out, steps, eval_every, baseline, extra) -> list[str]:
    args = [sys.executable, os.path.join(ROOT, "train_online_dpo.py"), "--preset", "text_world", "--output_dir", out,
            "--seed", str(seed), "--max_steps", str(steps), "--eval_every", str(eval_every),
            "--checkpoint_every", "0", "--sample_grid_every", "0", *VARIANTS[variant], f"--{knob[0]}", str(knob[1])]
    if baseline:
        args += ["--eval_baseline", baseline]
    return args + list(extra)


def read_rows(out: str) -> list[dict]:
    path = os.path.join(out, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a run killed mid-line
                break
    return rows


def finished(out: str, steps: int) -> bool:
    return any(r.get("step") == steps and "eval/reward_mean" in r for r in read_rows(out))


def has_step0_eval(out: str) -> bool:
    return any(r.get("step") == 0 and "eval/rewards" in r for r in read_rows(out))


def result(variant: str, seed: int, knob, out: str) -> dict:
    """One finished run -> its curve and totals."""
    rows = read_rows(out)
    config = json.load(open(os.path.join(out, "config.json")))
    images_per_step = config["prompts_per_step"] * config["samples_per_prompt"]
    evals = [r for r in rows if "eval/reward_mean" in r]
    train = [r for r in rows if "time/rollout_s" in r]
    first = evals[0]
    curve = [{"step": r["step"], "images": r["step"] * images_per_step, "exact_match": r["eval/exact_match"],
              "reward": r["eval/reward_mean"], "exact_match_gain_se": r.get("eval/exact_match_gain_se", 0.0)}
             for r in evals]
    collapse = next((c["step"] for c in curve[1:]
                     if c["exact_match"] - first["eval/exact_match"] < -2 * max(c["exact_match_gain_se"], 1e-9)), None)
    last = evals[-1]
    return {"variant": variant, "seed": seed, "knob": list(knob), "curve": curve, "collapse_step": collapse,
            "exact_match_gain": last["eval/exact_match"] - first["eval/exact_match"],
            "exact_match_gain_paired_se": last.get("eval/exact_match_gain_se"),
            "reward_gain_paired_se": last.get("eval/reward_gain_se"),
            "reward_gain": last["eval/reward_mean"] - first["eval/reward_mean"],
            "final_exact_match": last["eval/exact_match"], "images": len(train) * images_per_step,
            "rollout_tflop": sum(r.get("perf/rollout_tflop", 0.0) for r in train),
            "update_tflop": sum(r.get("perf/update_tflop", 0.0) for r in train),
            "rollout_seconds": sum(r["time/rollout_s"] for r in train),
            "train_seconds": sum(r["time/rollout_s"] + r["time/reward_s"] + r["time/update_s"] for r in train)}


def archive_key(r: dict) -> tuple:
    return r["variant"], r["seed"], tuple(r["knob"]), r["steps"], tuple(r["extra"])


def load_archive(path: str) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path} line {number}: not a JSON run result ({e})")
    return rows


def update_archive(path: str, runs: list[dict]) -> dict[tuple, dict]:
    """Archive + these runs (a re-run replaces its archived row), written atomically; returns all by key."""
    merged = {archive_key(r): r for r in load_archive(path)}
    merged.update({archive_key(r): r for r in runs})
    if runs:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            for key in sorted(merged, key=lambda k: (k[0], k[1], k[2], k[3], k[4])):
                f.write(json.dumps(merged[key]) + "\n")
        os.replace(path + ".tmp", path)
    return merged


def mean_se(values) -> tuple[float, float]:
    values = list(values)
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def images_to_reach(curve_mean: list[tuple[int, float]], level: float) -> float | None:
    """Rollout images at which a (images, exact match) curve first reaches `level` (linear interpolation)."""
    for (i0, e0), (i1, e1) in zip(curve_mean, curve_mean[1:]):
        if e1 >= level:
            return i0 + (i1 - i0) * ((level - e0) / (e1 - e0) if e1 != e0 else 1.0) if e0 < level else i0
    return None


def mean_curve(results: list[dict]) -> list[tuple[int, float, float]]:
    """(images, mean exact match over seeds, standard error over seeds) at every eval step all runs have;
    with one seed the standard error is the run's paired one against its step-0 eval (over the eval images)."""
    steps = sorted(set.intersection(*({c["step"] for c in r["curve"]} for r in results)))
    out = []
    for step in steps:
        points = [next(c for c in r["curve"] if c["step"] == step) for r in results]
        mean, se = mean_se(p["exact_match"] for p in points)
        out.append((points[0]["images"], mean, se if len(points) > 1 else points[0]["exact_match_gain_se"]))
    return out


def summarise(results: list[dict]) -> dict:
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    summary = {}
    for variant, runs in by_variant.items():
        s = {"seeds": sorted(r["seed"] for r in runs), "knob": runs[0]["knob"],
             "exact_match_gain_by_seed": [r["exact_match_gain"] for r in sorted(runs, key=lambda r: r["seed"])]}
        for key in ("exact_match_gain", "reward_gain", "final_exact_match"):
            s[key], s[key + "_se"] = mean_se(r[key] for r in runs)
        if len(runs) == 1:  # one seed: the gains' paired standard errors over the eval images
            for key in ("exact_match_gain", "reward_gain"):
                s[key + "_se"] = runs[0].get(key + "_paired_se") or math.nan
        for per in ("images", "rollout_tflop", "update_tflop", "rollout_seconds", "train_seconds"):
            s[per] = statistics.fmean(r[per] for r in runs)
            s[f"gain_per_{per}"] = s["exact_match_gain"] / s[per] if s[per] > 0 else None  # mean gain / mean cost
        s["collapsed"] = {r["seed"]: r["collapse_step"] for r in runs if r["collapse_step"] is not None}
        s["curve"] = mean_curve(runs)
        summary[variant] = s
    if PRESET in by_variant:  # each objective minus the preset DPO, paired by seed (same eval images, data order)
        preset_gain = {r["seed"]: r["exact_match_gain"] for r in by_variant[PRESET]}
        for variant, runs in by_variant.items():
            diffs = [r["exact_match_gain"] - preset_gain[r["seed"]] for r in runs if r["seed"] in preset_gain]
            summary[variant]["minus_preset"] = mean_se(diffs) if len(diffs) > 1 else (math.nan, math.nan)
    if "grpo" in summary:
        level = summary["grpo"]["curve"][-1][1]
        grpo_images = images_to_reach([(i, e) for i, e, _ in summary["grpo"]["curve"]], level)
        for variant, s in summary.items():
            reach = images_to_reach([(i, e) for i, e, _ in s["curve"]], level)
            s["images_to_grpo_final"] = reach
            s["fewer_images_than_grpo"] = (grpo_images / reach) if reach and grpo_images else None
    return summary


def plus_minus(value: float, se: float, sign: str = "+") -> str:
    return f"{value:{sign}.3f}" + ("" if se is None or math.isnan(se) else f" ± {se:.3f}")


def table(summary: dict) -> str:
    """Markdown table; ± is the standard error over seeds, or for a one-seed variant the paired one over the eval images."""
    lines = ["| objective (knob) | exact-match gain by seed | exact-match gain | reward gain | final exact match | gain / 1k images | "
             "minus preset's gain (paired by seed) | gain / rollout PFLOP | rollout s | train s | collapsed (seed: step) | x fewer images than GRPO |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for variant, s in summary.items():
        fewer = s.get("fewer_images_than_grpo")
        lines.append(
            f"| {variant} ({s['knob'][0]} {s['knob'][1]:g}) | {' / '.join(f'{g:+.3f}' for g in s['exact_match_gain_by_seed'])} "
            f"| {plus_minus(s['exact_match_gain'], s['exact_match_gain_se'])} "
            f"| {plus_minus(s['reward_gain'], s['reward_gain_se'])} | {plus_minus(s['final_exact_match'], s['final_exact_match_se'], '')} "
            f"| {1000 * s['gain_per_images']:+.4f} "
            f"| {'-' if variant == PRESET or math.isnan(s.get('minus_preset', (math.nan,))[0]) else plus_minus(*s['minus_preset'])} "
            f"| {1000 * s['gain_per_rollout_tflop']:+.3f} | {s['rollout_seconds']:.0f} | {s['train_seconds']:.0f} "
            f"| {', '.join(f'{k}: {v}' for k, v in s['collapsed'].items()) or 'none'} "
            f"| {'-' if 'fewer_images_than_grpo' not in s else ('not reached' if fewer is None else f'{fewer:.2f}')} |")
    return "\n".join(lines)


def versus_base(results: list[dict], by_key: dict, steps: int, extra: tuple) -> list[dict]:
    """Each lever or deviation (DERIVED) against its base variant on the seeds both have run (the base's
    runs may come from the archive alone): the final exact match's difference, paired by seed (+- the SE
    over seeds; one seed: the lever's own paired SE over the eval images), and the ratios of mean gain per
    mean rollout TFLOP and per rollout second. `goal`: the cheaper-rollout target, >= 2x the gain per
    rollout TFLOP with the final exact match at most 1 SE lower (None where the rollout costs the same)."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in results if r["variant"] in DERIVED):
        base = DERIVED[variant][0]
        pairs = [(r, by_key[key]) for r in results if r["variant"] == variant
                 for key in [(base, r["seed"], tuple(r["knob"]), steps, tuple(extra))] if key in by_key]
        if not pairs:
            continue
        diff, diff_se = mean_se(r["final_exact_match"] - b["final_exact_match"] for r, b in pairs)
        if len(pairs) == 1:
            diff_se = pairs[0][0].get("exact_match_gain_paired_se") or math.nan

        def ratio(cost):
            mine = statistics.fmean(r["exact_match_gain"] for r, _ in pairs) / statistics.fmean(r[cost] for r, _ in pairs)
            theirs = statistics.fmean(b["exact_match_gain"] for _, b in pairs) / statistics.fmean(b[cost] for _, b in pairs)
            return mine / theirs if theirs > 0 else math.nan

        per_tflop = ratio("rollout_tflop")
        rows.append({"variant": variant, "base": base, "seeds": sorted(r["seed"] for r, _ in pairs),
                     "gain": statistics.fmean(r["exact_match_gain"] for r, _ in pairs),
                     "base_gain": statistics.fmean(b["exact_match_gain"] for _, b in pairs),
                     "rollout_tflop_frac": statistics.fmean(r["rollout_tflop"] / b["rollout_tflop"] for r, b in pairs),
                     "final_diff": diff, "final_diff_se": diff_se, "gain_per_rollout_tflop_ratio": per_tflop,
                     "gain_per_rollout_second_ratio": ratio("rollout_seconds"),
                     "goal": None if rows_cost_same(pairs) else bool(per_tflop >= 2 and diff >= -diff_se)})
    return rows


def rows_cost_same(pairs) -> bool:  # a deviation, not a cheaper rollout: the goal does not apply
    return all(abs(r["rollout_tflop"] - b["rollout_tflop"]) <= 1e-6 * b["rollout_tflop"] for r, b in pairs)


def versus_table(rows: list[dict]) -> str:
    lines = ["| variant (vs base) | seeds | exact-match gain (base's) | rollout TFLOP vs base | final exact match - base's "
             "| gain per rollout TFLOP vs base | per rollout second | >= 2x per TFLOP, final >= -1 SE |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} (vs {r['base']}) | {', '.join(map(str, r['seeds']))} | {r['gain']:+.3f} ({r['base_gain']:+.3f}) "
                     f"| {r['rollout_tflop_frac']:.2f} | {plus_minus(r['final_diff'], r['final_diff_se'])} "
                     f"| {r['gain_per_rollout_tflop_ratio']:.2f} | {r['gain_per_rollout_second_ratio']:.2f} | {'-' if r['goal'] is None else 'yes' if r['goal'] else 'no'} |")
    return "\n".join(lines)


def plot(summary: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for variant, s in summary.items():
        images = [i for i, _, _ in s["curve"]]
        mean = [m for _, m, _ in s["curve"]]
        se = [e for _, _, e in s["curve"]]
        seeds = len(s["seeds"])
        ax.plot(images, mean, marker="o", ms=3, label=f"{variant} ({seeds} seed{'s' if seeds > 1 else ''})")
        ax.fill_between(images, [m - e for m, e in zip(mean, se)], [m + e for m, e in zip(mean, se)], alpha=0.15)
    ax.set_xlabel("rollout images")
    ax.set_ylabel("eval exact match (192 images)")
    one_seed = all(len(s["seeds"]) == 1 for s in summary.values())
    ax.set_title("Text world, equal rollout budget: " + ("one seed, band = paired SE over the eval images" if one_seed
                                                          else "mean, band = SE over seeds (one seed: paired SE)"), fontsize=10)
    if "grpo" in summary:
        ax.axhline(summary["grpo"]["curve"][-1][1], color="grey", lw=0.8, ls=":", label="GRPO's final")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="one folder per run in here; re-running resumes")
    parser.add_argument("--variants", nargs="+", default=CORE, choices=list(VARIANTS), metavar="VARIANT",
                        help=f"default: the objectives; also the levers and deviations {', '.join(DERIVED)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each with OMP_NUM_THREADS=1")
    parser.add_argument("--knob", nargs="+", default=[], metavar="VARIANT=VALUE", help="override KNOBS' value")
    parser.add_argument("--sweep", nargs="*", default=None, metavar="VARIANT",
                        help="first sweep the main knob (KNOBS) of these variants (none named: all) on the first seed")
    parser.add_argument("--summary_only", action="store_true", help="run nothing: summarise the finished runs")
    parser.add_argument("--plot", default="", help="write the curves to this PNG")
    parser.add_argument("--json", default="", help="write the summary (and every run) to this JSON file")
    parser.add_argument("--archive", default="", help="JSON-lines file of finished runs: updated with the workdir's, "
                        "and its runs are summarised with them (the workdir's win)")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run")
    args = parser.parse_args()
    knobs = {v: (KNOBS[v][0], KNOBS[v][1]) for v in args.variants}
    for item in args.knob:
        variant, value = item.split("=")
        knobs[variant] = (KNOBS[variant][0], float(value))
    os.makedirs(args.workdir, exist_ok=True)
    jobs = []  # (variant, seed, knob), seed-major
    if args.sweep is not None:
        jobs += [(v, args.seeds[0], (KNOBS[v][0], x)) for v in (args.sweep or args.variants) for x in KNOBS[v][2]]
    jobs += [(v, s, knobs[v]) for s in args.seeds for v in args.variants]
    jobs = list(dict.fromkeys(jobs))
    if not args.summary_only:
        execute(jobs, args)
    in_workdir = [dict(result(v, s, k, os.path.join(args.workdir, run_name(v, s, k))), steps=args.steps, extra=args.extra)
                  for v, s, k in jobs if finished(os.path.join(args.workdir, run_name(v, s, k)), args.steps)]
    by_key = update_archive(args.archive, in_workdir) if args.archive else {archive_key(r): r for r in in_workdir}
    finished_runs = [by_key[key] for key in ((v, s, k, args.steps, tuple(args.extra)) for v, s, k in jobs) if key in by_key]
    results = [r for r in finished_runs if tuple(r["knob"]) == knobs[r["variant"]]]
    summary = summarise(results)
    print(table(summary))
    versus = versus_base(results, by_key, args.steps, tuple(args.extra))
    if versus:
        print(versus_table(versus))
    swept = [r for r in finished_runs if r["seed"] == args.seeds[0] and args.sweep is not None]
    for variant in dict.fromkeys(r["variant"] for r in swept):
        print(f"sweep {variant} (seed {args.seeds[0]}): " + "; ".join(
            f"{r['knob'][0]} {r['knob'][1]:g}: {r['exact_match_gain']:+.3f} ± {r['exact_match_gain_paired_se']:.3f} "
            f"(reward {r['reward_gain']:+.3f}{', collapsed at step %d' % r['collapse_step'] if r['collapse_step'] else ''})"
            for r in swept if r["variant"] == variant))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "versus_base": versus, "runs": results}, f, indent=1)
    if args.plot:
        plot(summary, args.plot)


def execute(jobs, args):
    import shutil

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    archived = {archive_key(r) for r in load_archive(args.archive)}
    pending = [j for j in jobs if not finished(os.path.join(args.workdir, run_name(*j)), args.steps)
               and (j[0], j[1], j[2], args.steps, tuple(args.extra)) not in archived]
    # every run takes one step-0 eval (--eval_baseline): a finished run's, else the first run's once it has it
    outs = (os.path.join(args.workdir, run_name(*j)) for j in jobs if j not in pending)
    baseline = next((out for out in outs if has_step0_eval(out)), "")
    running: list[tuple[subprocess.Popen, tuple, str]] = []
    while pending or running:
        while pending and len(running) < args.jobs and (not baseline or has_step0_eval(baseline)):
            job = pending.pop(0)
            out = os.path.join(args.workdir, run_name(*job))
            if os.path.exists(out):  # an unfinished earlier attempt: start it again from scratch
                shutil.rmtree(out)
            cmd = command(job[0], job[1], job[2], out, args.steps, args.eval_every, baseline, args.extra)
            log = open(out + ".log", "w")
            running.append((subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT), job, out))
            print(f"started {run_name(*job)}", flush=True)
            if not baseline:
                baseline = out
                break
        time.sleep(2)
        for proc, job, out in list(running):
            if proc.poll() is None:
                continue
            running.remove((proc, job, out))
            ok = proc.returncode == 0 and finished(out, args.steps)
            if ok and args.archive:  # at once: a comparison stopped later keeps every finished run
                update_archive(args.archive, [dict(result(*job, out), steps=args.steps, extra=args.extra)])
            print(f"{'done' if ok else f'FAILED (exit {proc.returncode})'} {run_name(*job)} (log {out}.log)", flush=True)
            if out == baseline and not has_step0_eval(out):
                raise SystemExit(f"the first run {out} failed before its step-0 eval: see {out}.log")


if __name__ == "__main__":
    main()
