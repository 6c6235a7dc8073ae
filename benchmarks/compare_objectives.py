"""Every online objective at an equal rollout budget on the text world: the project's headline table.

    python benchmarks/compare_objectives.py --workdir outputs/compare --seeds 0 1 2 3 4 --jobs 2 \
        --archive docs/results/compare_objectives_v2.jsonl
    python benchmarks/compare_objectives.py --workdir outputs/compare --seeds 0 1 2 3 4 --summary_only --defaults 1 \
        --archive docs/results/compare_objectives.jsonl --plot docs/img/compare_objectives.png   # the runs of 5d1b2a8

Each run is a full `train_online_dpo.py --preset text_world` run (the same base model, prompts, rollout
budget and eval for every objective; the seed changes the data order, the rollout seeds and the
noise), each objective at its main knob (KNOBS: the value its sweep chose; `--sweep` re-runs the
sweep on the first seed). Runs are separate processes with OMP_NUM_THREADS=1, `--jobs` at a time, in
seed-major order so that an interrupted comparison has whole seeds; a run whose metrics.jsonl already
holds its final eval is not run again (the command resumes). All runs take the first run's step-0
eval (`--eval_baseline`): one base model, one baseline.

Reported per objective (compare_stats.py states each rule and why): exact-match and reward gains (mean
+- SE over seeds; one seed: the run's SE clustered by prompt, "image-level SE (old row)" for rows archived
without per-image data), final exact match, gain per rollout image, TFLOP and second; collapses (an eval
COLLAPSE_MARGIN below the run's own peak so far); against `grpo`: x fewer rollout images to a fixed target
and the ratio of areas under the gain curves, with bootstrap intervals and per-seed values. `--plot`: the
curves. The tuning protocol (compare_stats.PROTOCOL, its rule above it) searches every objective alike on
TUNING_SEEDS, then runs an `official` and a `tuned` arm on REPORT_SEEDS; one command runs all of it and
resumes (each free slot starts the first run the protocol has reached that the archive lacks, tuning
first; `--dry_run` lists what is reachable now):

    python benchmarks/compare_objectives.py --workdir outputs/protocol --jobs 2 --run_protocol \
        --archive docs/results/compare_objectives_v2.jsonl
    python benchmarks/compare_objectives.py --workdir outputs/protocol --protocol \
        --archive docs/results/compare_objectives_v2.jsonl --plot_sensitivity docs/img/lr_sensitivity.png

`--protocol` prints each configuration's score and the winners; `--summary_only --archive FILE` prints,
after the table of KNOBS' runs, the official and tuned arms' tables (`--plot_arms PREFIX`: their curves).

`--archive FILE` keeps every finished run's result (its curve with per-image evals, and totals; one JSON
line per run keyed by variant, seed, knob, steps and extra flags; written as each run ends; an archived
run is not run again) and summarises the archive's runs with the workdir's: a comparison over several
sessions or machines accumulates in the file (docs/results/compare_objectives.jsonl is the project's).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import compare_plots
import compare_stats as stats
from compare_archive import DEFAULTS, archive_key, load_archive, update_archive

READ_DEFAULTS = DEFAULTS  # --defaults: the archive rows a summary reads (runs are always of today's defaults)
from compare_stats import (KNOB_GRID, LR_GRID, OFFICIAL_UPDATES, PROTOCOL, REPORT_SEEDS, TUNING_SEEDS, canonical,  # noqa: F401
                           images_to_reach, mean_se, official_config, plus_minus, protocol_configs, protocol_plan,
                           versus_table)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    "best_worst": ["--objective", "dpo", "--pair_strategy", "best_worst"],
    # the frozen reference pinned: the text_world preset's moving one is top_bottom_trdpo
    "top_bottom": ["--objective", "dpo", "--pair_strategy", "top_bottom", "--ref_update_every", "0"],
    "dgpo": ["--objective", "dgpo"],
    "nft": ["--objective", "nft"],
    "awm": ["--objective", "awm"],
    # Flow-GRPO-Fast as its official SD3.5 configs (docs/objectives.md, Flow-GRPO): an SDE window of 3 steps
    # at a random start in the first half, all trained, noise 0.8, clip 1e-5, no KL (so no reference forward);
    # 2 updates per rollout. Runs archived with defaults 1 ran a fixed window 0,2 at the default noise, clip and KL.
    "grpo": ["--objective", "grpo", "--grpo_sde_window", "random:3", "--grpo_timestep_fraction", "1",
             "--grpo_noise_level", "0.8", "--grpo_clip_range", "1e-5", "--grpo_kl_weight", "0", "--updates_per_rollout", "2"],
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
    # online DPO's stabilising levers (docs/objectives.md, "Keeping online DPO stable")
    "top_bottom_disjoint": ("top_bottom", ["--update_split", "disjoint"]),
    "top_bottom_sdpo": ("top_bottom", ["--winner_preserving", "true"]),
    "top_bottom_rpo10": ("top_bottom", ["--chosen_sft_weight", "10"]),
    "top_bottom_trdpo": ("top_bottom", ["--ref_update_every", "40", "--ref_update_alpha", "0.6"]),
    # the moving reference with a second lever: margin weighting, a reference moving twice as often, a hard copy
    "top_bottom_trdpo_margin": ("top_bottom_trdpo", ["--pair_weighting", "margin"]),
    "top_bottom_trdpo_every20": ("top_bottom_trdpo", ["--ref_update_every", "20"]),
    "top_bottom_trdpo_hard": ("top_bottom_trdpo", ["--ref_update_alpha", "1.0"]),
    # every pair of a group (~4x the preset's pairs once ties drop), one pass: about the preset's pair-updates
    "all_pairs_trdpo": ("top_bottom_trdpo", ["--pair_strategy", "all", "--updates_per_rollout", "1",
                                             "--ref_update_every", "10"]),
    # 4 noise / sigma draws per pair and optimizer step (DGPO's official 4; the group objectives train 4-7 timesteps
    # per sample and step on this world, Diffusion-DPO one): the update's compute closer to theirs
    "top_bottom_trdpo_t4": ("top_bottom_trdpo", ["--train_timesteps", "4"]),
    # 16 samples of 4 prompts per step instead of 8 of 8 (the same 64 images): wider top/bottom margins, fewer ties
    "top_bottom_trdpo_k16": ("top_bottom_trdpo", ["--samples_per_prompt", "16", "--prompts_per_step", "4"]),
}
for _name, (_base, _flags) in DERIVED.items():  # a derived flag replaces the base's of the same name
    _kept = [i for i in range(0, len(VARIANTS[_base]), 2) if VARIANTS[_base][i] not in _flags[::2]]
    VARIANTS[_name] = [f for i in _kept for f in VARIANTS[_base][i:i + 2]] + _flags
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
# the text_world preset's objective, the others compared with it, and the default --variants, by the defaults
# the archive rows were run with (compare_archive.DEFAULTS): the moving-reference DPO is the preset's since 2
PRESETS_BY_DEFAULTS = {1: "top_bottom", 2: "top_bottom_trdpo"}
CORE_BY_DEFAULTS = {1: ["best_worst", "top_bottom", "dgpo", "nft", "awm", "grpo"],
                    2: ["top_bottom_trdpo", "dgpo", "nft", "awm", "grpo"]}
PRESET, CORE = PRESETS_BY_DEFAULTS[DEFAULTS], CORE_BY_DEFAULTS[DEFAULTS]
TEXT_WORLD_LR, TEXT_WORLD_UPDATES = 5e-4, 4  # train_online_dpo.PRESETS["text_world"]: a run without the flags


def run_defaults(variant: str) -> tuple[float, int]:
    """(learning rate, updates per rollout) a run of `variant` gets without protocol flags."""
    flags = VARIANTS[variant]
    updates = int(flags[flags.index("--updates_per_rollout") + 1]) if "--updates_per_rollout" in flags else TEXT_WORLD_UPDATES
    return TEXT_WORLD_LR, updates


def config_flags(variant: str, lr: float, updates: int) -> tuple[str, ...]:
    """The flags that set a configuration: only those that differ from the run's default, so a protocol run
    and an earlier run of the same configuration share their archive key."""
    default_lr, default_updates = run_defaults(variant)
    flags = () if lr == default_lr else ("--learning_rate", f"{lr:g}")
    if updates == default_updates:
        return flags
    flags += ("--updates_per_rollout", str(updates))
    if "--ref_update_every" in VARIANTS[variant]:  # the reference moves every 10 rollout steps whatever the passes
        every = int(VARIANTS[variant][VARIANTS[variant].index("--ref_update_every") + 1])
        flags += ("--ref_update_every", str(every * updates // default_updates)) if every else ()
    return flags


def config_job(variant: str, seed: int, config: tuple) -> tuple:
    lr, updates, knob = config
    return variant, seed, (PROTOCOL[variant][2], knob), config_flags(variant, lr, updates)


def tuning_rows(by_key: dict, steps: int, extra: tuple):
    """rows(variant, config) -> the archived run of each tuning seed (None where missing)."""
    return lambda variant, config: [by_key.get(job_key(config_job(variant, seed, config), steps, extra)) for seed in TUNING_SEEDS]


def protocol_jobs(variants, by_key: dict, steps: int, extra: tuple) -> dict[str, list[tuple]]:
    """{"tuning", "official", "tuned"}: the jobs each part of the protocol has reached, from the archive."""
    out = {"tuning": [], "official": [], "tuned": []}
    for variant in variants:
        stages, winner = protocol_plan(variant, stats.config_score(variant, tuning_rows(by_key, steps, extra)))
        out["tuning"] += [config_job(variant, s, c) for c in protocol_configs(stages) for s in TUNING_SEEDS]
        out["official"] += [config_job(variant, s, official_config(variant)) for s in REPORT_SEEDS]
        out["tuned"] += [config_job(variant, s, winner) for s in REPORT_SEEDS] if winner else []
    return out


def run_name(variant: str, seed: int, knob: tuple[str, float], flags: tuple = ()) -> str:  # flags: config_flags'
    return f"{variant}-s{seed}-{knob[0]}{knob[1]:g}" + "".join(f"-{f[2:]}{v}" for f, v in zip(flags[::2], flags[1::2]))


def job_key(job: tuple, steps: int, extra) -> tuple:
    """A job's archive key: its flags, the flags every run of the command gets (`--extra`), the defaults."""
    return job[0], job[1], tuple(job[2]), steps, tuple(job[3]) + tuple(extra), READ_DEFAULTS


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
    """One finished run -> its curve (with each eval's per-image exact match and reward, and each image's
    prompt: the eval is prompt-major, evaluation.evaluate) and totals."""
    rows = read_rows(out)
    config = json.load(open(os.path.join(out, "config.json")))
    images_per_step = config["prompts_per_step"] * config["samples_per_prompt"]
    evals = [r for r in rows if "eval/reward_mean" in r]
    train = [r for r in rows if "time/rollout_s" in r]
    first = evals[0]
    curve = [{"step": r["step"], "images": r["step"] * images_per_step, "exact_match": r["eval/exact_match"],
              "reward": r["eval/reward_mean"], "exact_match_gain_se": r.get("eval/exact_match_gain_se", 0.0)}
             for r in evals]
    per_image = all(r.get("eval/rewards") for r in evals) and "eval_samples_per_prompt" in config
    if per_image:  # exact match per image as evaluation.exact_matches computes it
        for point, r in zip(curve, evals):
            point["exact_by_image"] = [int(x >= 1.0 - 1e-9) for x in r["eval/rewards"]]
            point["reward_by_image"] = [round(x, 6) for x in r["eval/rewards"]]
    collapse = stats.collapse(curve)
    last = evals[-1]
    out_row = {"variant": variant, "seed": seed, "knob": list(knob), "curve": curve, "defaults": DEFAULTS,
               "collapse_step": collapse and collapse[0], "collapse_drop": collapse and collapse[1],
               "exact_match_gain": last["eval/exact_match"] - first["eval/exact_match"],
               "exact_match_gain_paired_se": last.get("eval/exact_match_gain_se"),
               "reward_gain_paired_se": last.get("eval/reward_gain_se"),
               "reward_gain": last["eval/reward_mean"] - first["eval/reward_mean"],
               "final_exact_match": last["eval/exact_match"], "images": len(train) * images_per_step,
               "rollout_tflop": sum(r.get("perf/rollout_tflop", 0.0) for r in train),
               "update_tflop": sum(r.get("perf/update_tflop", 0.0) for r in train),
               "rollout_seconds": sum(r["time/rollout_s"] for r in train),
               "train_seconds": sum(r["time/rollout_s"] + r["time/reward_s"] + r["time/update_s"] for r in train)}
    if per_image:
        per_prompt = config["eval_samples_per_prompt"]
        out_row["image_prompt"] = [k // per_prompt for k in range(len(evals[0]["eval/rewards"]))]
    return out_row


def summarise(results: list[dict]) -> dict:
    return stats.summarise(results, PRESET)


def versus_base(results: list[dict], by_key: dict, steps: int, extra: tuple) -> list[dict]:
    return stats.versus_base(results, by_key, steps, extra, DERIVED)


def table(summary: dict) -> str:
    return stats.table(summary, PRESET)


def sensitivity_points(by_key: dict, variants, steps: int, extra: tuple) -> dict[str, list[tuple[float, list[float]]]]:
    """{variant: [(learning rate, final exact match of each tuning seed)]}: its stage-1 tuning runs (the
    official knob, the current updates per rollout) that are archived."""
    out = {}
    for variant in variants:
        stage1 = sorted(protocol_plan(variant, lambda c: None)[0][0])
        points = [(c[0], [by_key[k]["final_exact_match"] for s in TUNING_SEEDS
                          for k in [job_key(config_job(variant, s, c), steps, extra)] if k in by_key]) for c in stage1]
        out[variant] = [(lr, finals) for lr, finals in points if finals]
    return out


def fail(message: str):  # a user error before any run starts: one line, exit 2
    print(f"compare_objectives.py: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_knobs(items, variants) -> dict:
    """--knob VARIANT=VALUE items -> {variant: (knob, value)} over KNOBS' defaults, every item checked."""
    knobs = {v: (KNOBS[v][0], KNOBS[v][1]) for v in variants}
    for item in items:
        variant, equals, value = item.partition("=")
        if not equals:
            fail(f"--knob {item!r}: expected VARIANT=VALUE, e.g. nft=0.3")
        if variant not in KNOBS:
            fail(f"--knob {item!r}: unknown variant {variant!r} (valid: {', '.join(KNOBS)})")
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not math.isfinite(number):
            fail(f"--knob {item!r}: {value!r} is not a finite number (the value of {KNOBS[variant][0]})")
        knobs[variant] = (KNOBS[variant][0], number)
    return knobs


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="one folder per run in here; re-running resumes")
    parser.add_argument("--variants", nargs="+", default=None, choices=list(VARIANTS), metavar="VARIANT",
                        help=f"default: the objectives of --defaults (CORE_BY_DEFAULTS); also the levers and deviations {', '.join(DERIVED)}")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time, each with OMP_NUM_THREADS=1")
    parser.add_argument("--knob", nargs="+", default=[], metavar="VARIANT=VALUE", help="override KNOBS' value")
    parser.add_argument("--sweep", nargs="*", default=None, metavar="VARIANT",
                        help="first sweep the main knob (KNOBS) of these variants (none named: all) on the first seed")
    parser.add_argument("--summary_only", action="store_true", help="run nothing: summarise the finished runs")
    parser.add_argument("--run_protocol", action="store_true",
                        help="run the tuning protocol (PROTOCOL) and both arms, round by round, for the --variants it covers")
    parser.add_argument("--protocol", action="store_true", help="run nothing: print the tuning table from the archive")
    parser.add_argument("--dry_run", action="store_true", help="run nothing: list the runs the command would start next")
    parser.add_argument("--plot", default="", help="write the curves to this PNG")
    parser.add_argument("--plot_arms", default="", help="write each protocol arm's curves to PREFIX-official.png and "
                        "PREFIX-tuned.png (with --archive)")
    parser.add_argument("--plot_sensitivity", default="", help="write final exact match vs learning rate (tuning runs) to this PNG")
    parser.add_argument("--json", default="", help="write the summary (and every run) to this JSON file")
    parser.add_argument("--archive", default="", help="JSON-lines file of finished runs: updated with the workdir's, "
                        "and its runs are summarised with them (the workdir's win)")
    parser.add_argument("--defaults", type=int, default=DEFAULTS, choices=[1, DEFAULTS],
                        help="summarise the archived runs of these trainer defaults (compare_archive.DEFAULTS; 1 = "
                        "before the official group updates); with --summary_only only")
    parser.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="flags passed to every run")
    args = parser.parse_args()
    if args.defaults != DEFAULTS and not (args.summary_only or args.protocol):
        fail(f"--defaults {args.defaults}: runs are always of today's defaults ({DEFAULTS}); add --summary_only to read them")
    global READ_DEFAULTS, PRESET
    READ_DEFAULTS, PRESET = args.defaults, PRESETS_BY_DEFAULTS[args.defaults]
    args.variants = args.variants or CORE_BY_DEFAULTS[args.defaults]
    knobs = parse_knobs(args.knob, args.variants)
    unknown = [v for v in args.sweep or [] if v not in VARIANTS]
    if unknown:
        fail(f"--sweep {unknown[0]!r}: unknown variant (valid: {', '.join(VARIANTS)})")
    if (args.run_protocol or args.protocol or args.plot_sensitivity) and not args.archive:
        fail("--run_protocol, --protocol and --plot_sensitivity read the tuning runs from --archive: name the file")
    protocol_variants = [v for v in args.variants if v in PROTOCOL]
    if args.protocol or args.plot_sensitivity:
        by_key = {archive_key(r): r for r in load_archive(args.archive)}
        print(stats.protocol_table(protocol_variants, tuning_rows(by_key, args.steps, tuple(args.extra))))
        if args.plot_sensitivity:
            compare_plots.plot_sensitivity(sensitivity_points(by_key, protocol_variants, args.steps, tuple(args.extra)),
                                           TUNING_SEEDS, args.plot_sensitivity)
        return
    if args.run_protocol:
        return run_protocol(args, protocol_variants)
    jobs = []  # (variant, seed, knob, flags), seed-major
    if args.sweep is not None:
        jobs += [(v, args.seeds[0], (KNOBS[v][0], x), ()) for v in (args.sweep or args.variants) for x in KNOBS[v][2]]
    jobs += [(v, s, knobs[v], ()) for s in args.seeds for v in args.variants]
    jobs = list(dict.fromkeys(jobs))
    if args.dry_run:
        return print_plan(jobs, args)
    if not args.summary_only:
        execute(jobs, args)
    by_key = collect(jobs, args)
    finished_runs = [by_key[key] for key in (job_key(j, args.steps, args.extra) for j in jobs) if key in by_key]
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
            f"(reward {r['reward_gain']:+.3f}{', collapsed at step %d' % stats.collapse(r['curve'])[0] if stats.collapse(r['curve']) else ''})"
            for r in swept if r["variant"] == variant))
    arms = arm_results(by_key, protocol_variants, args.steps, tuple(args.extra)) if args.archive else {}
    for arm, runs in arms.items():
        print(f"\n{arm} arm (report seeds {', '.join(map(str, REPORT_SEEDS))}; PROTOCOL):\n{table(summarise(runs))}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "versus_base": versus, "runs": results,
                       "arms": {arm: summarise(runs) for arm, runs in arms.items()}}, f, indent=1)
    if args.plot:
        compare_plots.plot_curves(summary, args.plot)
    for arm, runs in arms.items() if args.plot_arms else ():
        compare_plots.plot_curves(summarise(runs), f"{args.plot_arms}-{arm}.png", f"the {arm} arm")


def arm_results(by_key: dict, variants, steps: int, extra: tuple) -> dict[str, list[dict]]:
    """{"official": runs, "tuned": runs}: the archived report-seed runs of each arm (an arm without any: left out)."""
    planned = protocol_jobs(variants, by_key, steps, extra)
    arms = {arm: [by_key[k] for k in (job_key(j, steps, extra) for j in planned[arm]) if k in by_key]
            for arm in ("official", "tuned")}
    return {arm: runs for arm, runs in arms.items() if runs}


def collect(jobs, args) -> dict[tuple, dict]:
    """The jobs finished in the workdir, archived (with --archive); returns every known run by key."""
    in_workdir = [dict(result(v, s, k, out), steps=args.steps, extra=list(f) + list(args.extra))
                  for v, s, k, f in jobs for out in [os.path.join(args.workdir, run_name(v, s, k, f))]
                  if finished(out, args.steps)]
    return update_archive(args.archive, in_workdir) if args.archive else {archive_key(r): r for r in in_workdir}


def print_plan(jobs, args):
    archived = {archive_key(r) for r in load_archive(args.archive)}
    pending = [j for j in jobs if job_key(j, args.steps, args.extra) not in archived
               and not finished(os.path.join(args.workdir, run_name(*j)), args.steps)]
    print(f"{len(pending)} run(s) to start ({len(jobs) - len(pending)} of {len(jobs)} already finished):")
    for job in pending:
        out = os.path.join(args.workdir, run_name(*job))
        print(f"{run_name(*job)}: {' '.join(command(*job[:3], out, args.steps, args.eval_every, '', list(job[3]) + args.extra)[1:])}")


def run_protocol(args, variants):
    """Until nothing is missing: whenever a slot is free, start a run the protocol has reached that the
    archive lacks, the tuning runs first (each stage once the one before it is scored), then the official
    arm and the tuned arm (once chosen). Stops when runs did not finish (their logs say why)."""
    def reached() -> list[tuple]:
        by_key = collect([], args)
        planned = protocol_jobs(variants, by_key, args.steps, tuple(args.extra))
        missing = {part: [j for j in jobs if job_key(j, args.steps, args.extra) not in by_key] for part, jobs in planned.items()}
        return missing["tuning"] + missing["official"] + missing["tuned"]

    if args.dry_run:
        print("later stages and the tuned arm follow from these runs' scores")
        by_key = collect([], args)
        planned = protocol_jobs(variants, by_key, args.steps, tuple(args.extra))
        return print_plan(planned["tuning"] + planned["official"] + planned["tuned"], args)
    failed = execute([], args, refill=reached)
    if failed:
        raise SystemExit(f"{len(failed)} protocol run(s) did not finish, e.g. {run_name(*failed[0])}: see its log in {args.workdir}")
    by_key = collect([], args)
    print(stats.protocol_table(variants, tuning_rows(by_key, args.steps, tuple(args.extra))))


def execute(jobs, args, refill=None) -> list[tuple]:
    """Run the jobs `--jobs` at a time; with `refill`, each free slot asks it for the jobs to run now, in
    order (those already started are skipped). -> the jobs that did not finish."""
    import shutil

    os.makedirs(args.workdir, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    archived = {archive_key(r) for r in load_archive(args.archive)}
    pending = [j for j in jobs if not finished(os.path.join(args.workdir, run_name(*j)), args.steps)
               and job_key(j, args.steps, args.extra) not in archived]
    # every run takes one step-0 eval (--eval_baseline): a finished run's (one that is not started again),
    # else the first run's once it has it
    outs = sorted(os.path.join(args.workdir, name) for name in os.listdir(args.workdir))
    baseline = next((out for out in outs if os.path.isdir(out) and finished(out, args.steps) and has_step0_eval(out)), "")
    running: list[tuple[subprocess.Popen, tuple, str]] = []
    started, failed = set(), []
    while True:
        if refill and len(running) < args.jobs:  # asked again at each free slot: a stage scored starts the next
            pending = [j for j in refill() if j not in started]
        if not (pending or running):
            return failed
        while pending and len(running) < args.jobs and (not baseline or has_step0_eval(baseline)):
            job = pending.pop(0)
            started.add(job)
            out = os.path.join(args.workdir, run_name(*job))
            if os.path.exists(out):  # an unfinished earlier attempt: start it again from scratch
                shutil.rmtree(out)
            cmd = command(job[0], job[1], job[2], out, args.steps, args.eval_every, baseline, list(job[3]) + args.extra)
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
                update_archive(args.archive, [dict(result(*job[:3], out), steps=args.steps, extra=list(job[3]) + args.extra)])
            failed += [] if ok else [job]
            print(f"{'done' if ok else f'FAILED (exit {proc.returncode})'} {run_name(*job)} (log {out}.log)", flush=True)
            if out == baseline and not has_step0_eval(out):
                raise SystemExit(f"the first run {out} failed before its step-0 eval: see {out}.log")


if __name__ == "__main__":
    main()
