"""Offline DPO's stabilising levers side by side: each variant (VARIANTS) on every seed, one trainer run each.

    python data_process/make_offline_pairs.py --preset text_world      # once: outputs/pairs/text_world.parquet
    python benchmarks/compare_offline.py --workdir outputs/compare_offline --seeds 0 1 2 \
        --archive docs/results/compare_offline.jsonl
    python benchmarks/compare_offline.py --summary_only --archive docs/results/compare_offline.jsonl
    python benchmarks/compare_offline.py --workdir /tmp/c --preset cpu_tiny --extra --max_steps 4 --eval_every 2

A run is `train_offline_dpo.py --preset PRESET --seed S` plus the variant's flags plus `--extra`, in its own
process (OMP_NUM_THREADS=1), `--jobs` at a time, seed-major (an interrupted comparison has whole seeds), in
WORKDIR/<variant>-s<seed> (its log beside it as .log, and as .json the flags it was started with: the mark
of a folder this script made; a folder without it is never touched, and only an unfinished one of its own
is deleted and started again). A run is finished when metrics.jsonl holds an eval at its config's max_steps.
`--seed` sets the order of the pairs (seeded per-epoch permutations, prompt_data.prompts_for_step), each
step's DPO noise and sigma (prompt_data.dpo_noise_seed) and the LoRA A init (set_seed; B = 0, so every run
starts at the base model). The eval's images have fixed seeds (prompt i, sample j: i * 1000 + j) whatever
`--seed`: every run's step-0 eval is the same images, so a gain paired by seed differs only by training.

`--archive FILE`: one JSON line per finished run (variant, seed, preset, its flags, --extra, the run's
config.json, and its eval curve with every eval's per-image rewards and mean exact match as metrics.jsonl
logs them), written atomically as each run ends; a run already archived (same variant, seed, preset and
flags) is not run again, and `--summary_only` builds the table from the archive (and the workdir) alone.
The table, per variant: the gain (final eval minus the run's own step-0 eval) in exact match where the eval
logs it (the OCR reward), else in mean reward; the mean +- SE over seeds (compare_stats.mean_se; none for one
seed); minus the preset's gain paired by seed; the collapsed seeds (compare_stats.collapse: an eval more
than COLLAPSE_MARGIN below the run's own peak so far, in the table's metric); each seed's curve.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time

import compare_stats as stats
from compare_archive import load_archive, update_archive
from compare_objectives import read_rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = {
    "preset": [],
    "trdpo": ["--ref_update_every", "40", "--ref_update_alpha", "0.6"],  # moving reference (TR-DPO), the online preset's
    # the online preset's reference moves 4 times in 40 rollout steps; offline text_world's 120 steps with 40 move it twice
    "trdpo20": ["--ref_update_every", "20", "--ref_update_alpha", "0.6"],
    "rpo10": ["--chosen_sft_weight", "10"],  # + 10 x the chosen sample's flow-matching loss (RPO)
    "sdpo": ["--winner_preserving", "true"],  # Diffusion-SDPO's winner-preserving rejected-gradient scale
}


def flags(variant: str, seed: int, preset: str, extra) -> list[str]:
    return ["--preset", preset, "--seed", str(seed), *VARIANTS[variant], *extra]


def key(variant: str, seed: int, preset: str, extra) -> tuple:
    """A run's archive key: a changed VARIANTS entry or --extra is another run, never taken for this one."""
    return variant, seed, preset, tuple(VARIANTS[variant]), tuple(extra)


def row_key(r: dict) -> tuple:  # an archive row's key(), with the flags it ran with
    return r["variant"], r["seed"], r["preset"], tuple(r["flags"]), tuple(r["extra"])


def marked_flags(out: str):
    """The flags this script started the folder's run with; None for a folder it did not make."""
    return json.load(open(out + ".json"))["flags"] if os.path.exists(out + ".json") else None


def finished(out: str) -> bool:
    path = os.path.join(out, "config.json")  # written as the run starts, with the max_steps it runs to
    steps = json.load(open(path))["max_steps"] if os.path.exists(path) else None
    return steps is not None and any(r.get("step") == steps and "eval/reward_mean" in r for r in read_rows(out))


def result(variant: str, seed: int, preset: str, extra, out: str) -> dict:
    """A finished run's archive row: its curve keeps each eval's per-image rewards (and exact match)."""
    curve = []
    for r in read_rows(out):
        if "eval/reward_mean" in r:
            point = {"step": r["step"], "reward": r["eval/reward_mean"], "rewards": r["eval/rewards"]}
            if "eval/exact_match" in r:
                point["exact_match"] = r["eval/exact_match"]
            curve.append(point)
    config = json.load(open(os.path.join(out, "config.json")))
    return {"variant": variant, "seed": seed, "preset": preset, "flags": VARIANTS[variant], "extra": list(extra),
            "config": config, "curve": curve}


def collect(jobs, args) -> dict[tuple, dict]:
    """Every known run of the jobs by key: the archive's, and the workdir's finished ones (archived here)."""
    known = {row_key(r): r for r in load_archive(args.archive)}
    new = []
    for variant, seed in jobs:
        out = os.path.join(args.workdir, f"{variant}-s{seed}")
        k = key(variant, seed, args.preset, args.extra)
        if k not in known and marked_flags(out) == flags(variant, seed, args.preset, args.extra) and finished(out):
            new.append(result(variant, seed, args.preset, args.extra, out))
            known[k] = new[-1]
    if new and args.archive:
        update_archive(args.archive, new, key=row_key)
    return known


def plan(jobs, args) -> list[tuple]:
    """The jobs to run: not archived, not finished; refuses (before any run) a folder it must not reuse."""
    known = collect(jobs, args)
    todo = []
    for variant, seed in jobs:
        out = os.path.join(args.workdir, f"{variant}-s{seed}")
        if key(variant, seed, args.preset, args.extra) in known:
            continue
        mark = marked_flags(out)
        if os.path.exists(out) and mark is None:
            raise SystemExit(f"compare_offline.py: {out} exists but this script did not make it: use another --workdir")
        if mark is not None and mark != flags(variant, seed, args.preset, args.extra):
            raise SystemExit(f"compare_offline.py: {out} holds a run of other flags ({' '.join(mark)}): use another --workdir")
        todo.append((variant, seed))
    return todo


def execute(todo, args) -> list[str]:
    """Runs the jobs `--jobs` at a time, archiving each as it ends. -> the folders of the runs that failed."""
    os.makedirs(args.workdir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    running, failed, todo = [], [], list(todo)
    while todo or running:
        while todo and len(running) < args.jobs:
            variant, seed = todo.pop(0)
            out = os.path.join(args.workdir, f"{variant}-s{seed}")
            run_flags = flags(variant, seed, args.preset, args.extra)
            if os.path.exists(out):  # its own unfinished run (plan checked the mark): start it again
                shutil.rmtree(out)
            with open(out + ".json", "w") as f:  # the mark first: the folder is then known to be ours
                json.dump({"flags": run_flags}, f)
            cmd = [sys.executable, os.path.join(ROOT, "train_offline_dpo.py"), *run_flags, "--output_dir", out]
            log = open(out + ".log", "w")
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
            running.append((proc, log, variant, seed, out))
            print(f"started {os.path.basename(out)}", flush=True)
        time.sleep(0.5)
        for job in [j for j in running if j[0].poll() is not None]:
            running.remove(job)
            proc, log, variant, seed, out = job
            log.close()
            ok = proc.returncode == 0 and finished(out)
            if ok and args.archive:  # at once: a comparison stopped later keeps every finished run
                update_archive(args.archive, [result(variant, seed, args.preset, args.extra, out)], key=row_key)
            why = "" if ok or proc.returncode else " (no eval at max_steps: make it a multiple of eval_every)"
            print(f"{'done' if ok else f'FAILED (exit {proc.returncode}){why}'} {os.path.basename(out)} (log {out}.log)", flush=True)
            failed += [] if ok else [out]
    return failed


def gain(run: dict, metric: str) -> float:
    return run["curve"][-1][metric] - run["curve"][0][metric]


def fmt(x: float, se: float = math.nan) -> str:
    return f"{x:+.4g}" + ("" if math.isnan(se) else f" ± {se:.2g}")


def table(runs: list[dict], variants) -> str:
    """Markdown: one row per variant with runs (see the module docstring)."""
    by_variant = {v: sorted((r for r in runs if r["variant"] == v), key=lambda r: r["seed"]) for v in VARIANTS}
    lines = ["| variant (flags) | gain in | final gain by seed | gain (mean ± SE over seeds) | minus preset's gain "
             "(paired by seed) | collapsed seeds | curve by seed (step: value) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for variant in [v for v in variants if by_variant[v]]:
        mine = by_variant[variant]
        metric = "exact_match" if all("exact_match" in p for r in mine for p in r["curve"]) else "reward"
        gains = [gain(r, metric) for r in mine]
        preset = {r["seed"]: gain(r, metric) for r in by_variant["preset"] if all(metric in p for p in r["curve"])}
        diffs = [g - preset[r["seed"]] for r, g in zip(mine, gains) if r["seed"] in preset]
        collapsed = [(r["seed"], c) for r in mine for c in [stats.collapse([{"step": p["step"], "exact_match": p[metric]}
                                                                             for p in r["curve"]])] if c]
        by_seed = ", ".join(f"s{r['seed']} {fmt(g)}" for r, g in zip(mine, gains))
        minus = fmt(*stats.mean_se(diffs)) if diffs and variant != "preset" else "-"
        falls = "".join(f"; s{s} at {c[0]} (-{c[1]:.3g})" for s, c in collapsed)
        curves = "; ".join(f"s{r['seed']} " + ", ".join(f"{p['step']}: {p[metric]:.4g}" for p in r["curve"]) for r in mine)
        lines.append(f"| {variant} ({' '.join(VARIANTS[variant]) or 'the preset'}) | {metric.replace('_', ' ')} | {by_seed} "
                     f"| {fmt(*stats.mean_se(gains))} | {minus} | {len(collapsed)} of {len(mine)}{falls} | {curves} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default="outputs/compare_offline", help="one folder per run; re-running resumes")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS), metavar="VARIANT")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--preset", default="text_world", help="train_offline_dpo.py's --preset of every run")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time, each with OMP_NUM_THREADS=1")
    parser.add_argument("--archive", default="", help="JSON-lines file of finished runs (see above)")
    parser.add_argument("--summary_only", action="store_true", help="run nothing: the table of the finished runs")
    parser.add_argument("--dry_run", action="store_true", help="run nothing: list the runs that would start")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run (last)")
    args = parser.parse_args(argv)
    # seed-major; the preset's runs always looked up: the other variants' gains are paired with them
    jobs = [(v, s) for s in args.seeds for v in dict.fromkeys(["preset", *args.variants])]
    wanted = [j for j in jobs if j[0] in args.variants]
    failed = []
    if args.dry_run:
        todo = plan(wanted, args)
        print(f"{len(todo)} run(s) to start ({len(wanted) - len(todo)} of {len(wanted)} archived or finished):")
        for v, s in todo:
            print(f"{v}-s{s}: train_offline_dpo.py {' '.join(flags(v, s, args.preset, args.extra))}")
        return
    if not args.summary_only:
        failed = execute(plan(wanted, args), args)
    known = collect(jobs, args)
    runs = [known[k] for k in (key(v, s, args.preset, args.extra) for v, s in jobs) if k in known]
    print(table(runs, args.variants))
    if failed:
        raise SystemExit(f"{len(failed)} run(s) did not finish, e.g. {failed[0]}: see its .log")


if __name__ == "__main__":
    main()
