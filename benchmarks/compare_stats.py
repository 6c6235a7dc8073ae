"""The statistics of benchmarks/compare_objectives.py: pure functions on its archive rows.

The eval is 24 prompts x 8 noise seeds = 192 images, prompt-major (evaluation.evaluate: image k is
prompt k // eval_samples_per_prompt). Images of one prompt share its text, so their exact matches
are not independent: a run's gain gets a standard error clustered by prompt (the paired per-image
difference averaged per prompt, then the SE over the prompt means). A mean over training seeds gets
the SE over seeds of the per-seed values (the seeds are independent runs). Ratios against GRPO get
a bootstrap interval: resample the seeds both objectives ran, and within each drawn seed the
prompts (the same draw for both: the same eval images), BOOTSTRAP_RESAMPLES times from
BOOTSTRAP_SEED. Rows archived before the per-image data was kept hold only their curve: their SE
is the image-level paired one and their bootstrap resamples seeds only. Also here: the tuning
protocol's rule and its choices (PROTOCOL, protocol_plan), and the tables.
"""

from __future__ import annotations

import math
import statistics

import numpy as np

# An eval this far (exact match) below the run's own peak so far is a collapse: ~1.5 image-level
# paired SEs of a 192-image eval (0.03-0.04 on the text world), so one eval's noise rarely crosses it
COLLAPSE_MARGIN = 0.05
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 2000
# The fixed level both curves must reach: GRPO's mean start + this fraction of GRPO's mean final
# exact-match gain (a level GRPO's mean curve reaches inside the budget whenever its gain is > 0)
TARGET_FRACTION = 0.5


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error of the mean (sample stdev / sqrt n; NaN for one value)."""
    values = list(values)
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan"))


def collapse(curve: list[dict], margin: float = COLLAPSE_MARGIN) -> tuple[int, float] | None:
    """(step, drop) of the first eval more than `margin` below the highest exact match before it
    (the start included); None when there is none."""
    peak = curve[0]["exact_match"]
    for point in curve[1:]:
        if peak - point["exact_match"] > margin:
            return point["step"], peak - point["exact_match"]
        peak = max(peak, point["exact_match"])
    return None


def cluster_se(values: list[float], clusters: list[int]) -> float:
    """Standard error of the mean of `values` clustered by `clusters` (equal-size clusters): the SE
    over the cluster means."""
    by_cluster: dict[int, list[float]] = {}
    for value, cluster in zip(values, clusters):
        by_cluster.setdefault(cluster, []).append(value)
    return mean_se(statistics.fmean(v) for v in by_cluster.values())[1]


def has_images(row: dict) -> bool:
    return "image_prompt" in row and all("exact_by_image" in point for point in row["curve"])


def gain_se(row: dict) -> tuple[float, str]:
    """A run's exact-match gain's SE and its kind: clustered by prompt where the row has per-image
    data, else the image-level paired SE it archived ("image-level SE (old row)")."""
    if has_images(row):
        first, last = row["curve"][0]["exact_by_image"], row["curve"][-1]["exact_by_image"]
        return cluster_se([a - b for a, b in zip(last, first)], row["image_prompt"]), "clustered by prompt"
    return row.get("exact_match_gain_paired_se") or math.nan, "image-level SE (old row)"


def prompt_matrix(row: dict) -> np.ndarray:
    """[evals, prompts] mean exact match per prompt at each eval; an old row: [evals, 1] (its curve)."""
    if not has_images(row):
        return np.array([[point["exact_match"]] for point in row["curve"]])
    prompts = sorted(set(row["image_prompt"]))
    index = np.array([prompts.index(p) for p in row["image_prompt"]])
    exact = np.array([point["exact_by_image"] for point in row["curve"]], dtype=float)
    return np.stack([exact[:, index == k].mean(axis=1) for k in range(len(prompts))], axis=1)


def images_to_reach(curve: list[tuple[float, float]], level: float) -> float | None:
    """Rollout images at which an (images, exact match) curve first reaches `level` (linear
    interpolation between evals); None if it never does."""
    if curve and curve[0][1] >= level:
        return curve[0][0]
    for (i0, e0), (i1, e1) in zip(curve, curve[1:]):
        if e1 >= level:
            return i0 + (i1 - i0) * (level - e0) / (e1 - e0)
    return None


def area(images, gains) -> float:
    """Trapezoid area under a gain curve over rollout images."""
    return sum((i1 - i0) * (g0 + g1) / 2 for i0, i1, g0, g1 in zip(images, images[1:], gains, gains[1:]))


def ratios(images, mine: list[np.ndarray], grpo: list[np.ndarray]) -> tuple[float, float]:
    """(x fewer images than GRPO to reach the target, area ratio) of seed-mean curves: each argument a
    list of per-seed exact-match curves at `images`. The first is 0.0 where this objective never
    reaches the target, NaN where GRPO's mean gain is <= 0 (no target); the second NaN where GRPO's
    area is <= 0."""
    mine_mean, grpo_mean = np.mean(mine, axis=0), np.mean(grpo, axis=0)
    grpo_area = area(images, grpo_mean - grpo_mean[0])
    area_ratio = area(images, mine_mean - mine_mean[0]) / grpo_area if grpo_area > 0 else math.nan
    if grpo_mean[-1] <= grpo_mean[0]:
        return math.nan, area_ratio
    level = grpo_mean[0] + TARGET_FRACTION * (grpo_mean[-1] - grpo_mean[0])
    theirs = images_to_reach(list(zip(images, grpo_mean)), level)
    ours = images_to_reach(list(zip(images, mine_mean)), level)
    fewer = 0.0 if ours is None else (math.inf if ours == 0 else theirs / ours)
    return fewer, area_ratio


def common_curves(runs: list[dict], grpo_runs: list[dict]):
    """(images, seeds, {seed: [evals, prompts] matrix} for each side) on the eval steps and seeds both have."""
    steps = sorted(set.intersection(*({p["step"] for p in r["curve"]} for r in runs + grpo_runs)))
    seeds = sorted({r["seed"] for r in runs} & {r["seed"] for r in grpo_runs})
    images = [next(p["images"] for p in runs[0]["curve"] if p["step"] == s) for s in steps]

    def matrices(side):
        out = {}
        for r in side:
            rows = [k for k, p in enumerate(r["curve"]) if p["step"] in steps]
            out[r["seed"]] = prompt_matrix(r)[rows]
        return out
    return images, seeds, matrices(runs), matrices(grpo_runs)


def against_grpo(runs: list[dict], grpo_runs: list[dict], resamples: int = BOOTSTRAP_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED) -> dict | None:
    """The two ratios against GRPO (x fewer images to the target, area under the gain curve), each with
    a 95 % percentile bootstrap interval over seeds and, within them, prompts; and the per-seed values:
    images to the target (None: not reached) and area under the gain curve."""
    images, seeds, mine, grpo = common_curves(runs, grpo_runs)
    if not seeds or len(images) < 2:
        return None
    curve = {s: mine[s].mean(axis=1) for s in seeds}
    grpo_curve = {s: grpo[s].mean(axis=1) for s in seeds}
    fewer, area_ratio = ratios(images, [curve[s] for s in seeds], [grpo_curve[s] for s in seeds])
    grpo_mean = np.mean([grpo_curve[s] for s in seeds], axis=0)
    level = grpo_mean[0] + TARGET_FRACTION * (grpo_mean[-1] - grpo_mean[0]) if grpo_mean[-1] > grpo_mean[0] else None
    same_prompts = all(mine[s].shape[1] == grpo[s].shape[1] > 1 for s in seeds)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        mine_b, grpo_b = [], []
        for s in rng.integers(0, len(seeds), len(seeds)):
            a, b = mine[seeds[s]], grpo[seeds[s]]
            if same_prompts:
                pick = rng.integers(0, a.shape[1], a.shape[1])
                a, b = a[:, pick], b[:, pick]
            mine_b.append(a.mean(axis=1))
            grpo_b.append(b.mean(axis=1))
        draws.append(ratios(images, mine_b, grpo_b))
    return {"target": level, "fewer_images": fewer, "fewer_images_ci": interval([d[0] for d in draws]),
            "area_ratio": area_ratio, "area_ratio_ci": interval([d[1] for d in draws]),
            "seeds": seeds, "prompts_resampled": same_prompts,
            "images_to_target_by_seed": [None if level is None else images_to_reach(list(zip(images, curve[s])), level)
                                         for s in seeds],
            "area_by_seed": [area(images, curve[s] - curve[s][0]) for s in seeds],
            "grpo_area_by_seed": [area(images, grpo_curve[s] - grpo_curve[s][0]) for s in seeds]}


def interval(values: list[float]) -> tuple[float, float]:
    """2.5th and 97.5th percentiles of the finite-or-infinite values (NaN draws left out)."""
    kept = np.array([v for v in values if not math.isnan(v)])
    if not len(kept):
        return math.nan, math.nan
    return float(np.percentile(kept, 2.5, method="lower")), float(np.percentile(kept, 97.5, method="higher"))


def tuning_score(row: dict) -> float:
    """The protocol's score of one run: the mean exact match of its last two evals."""
    return statistics.fmean(point["exact_match"] for point in row["curve"][-2:])


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


def summarise(results: list[dict], preset: str) -> dict:
    """Per variant: gains (mean +- SE over seeds; one seed: the run's own SE, clustered by prompt where the
    row has per-image data), costs, collapses (`collapse`), each minus `preset`'s gain paired by seed,
    and against `grpo` (`against_grpo`)."""
    by_variant: dict[str, list[dict]] = {}
    for r in results:
        by_variant.setdefault(r["variant"], []).append(r)
    summary = {}
    for variant, runs in by_variant.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        s = {"seeds": [r["seed"] for r in runs], "knob": runs[0]["knob"], "extra": runs[0].get("extra", []),
             "exact_match_gain_by_seed": [r["exact_match_gain"] for r in runs],
             "exact_match_gain_se_by_seed": [gain_se(r)[0] for r in runs]}
        for key in ("exact_match_gain", "reward_gain", "final_exact_match"):
            s[key], s[key + "_se"] = mean_se(r[key] for r in runs)
        s["se_kind"] = "over seeds"
        if len(runs) == 1:  # one seed: the gains' standard errors over the eval images
            s["exact_match_gain_se"], s["se_kind"] = gain_se(runs[0])
            s["reward_gain_se"] = runs[0].get("reward_gain_paired_se") or math.nan
        for per in ("images", "rollout_tflop", "update_tflop", "rollout_seconds", "train_seconds"):
            s[per] = statistics.fmean(r[per] for r in runs)
            s[f"gain_per_{per}"] = s["exact_match_gain"] / s[per] if s[per] > 0 else None  # mean gain / mean cost
        s["collapsed"] = {r["seed"]: found for r in runs for found in [collapse(r["curve"])] if found}
        s["curve"] = mean_curve(runs)
        summary[variant] = s
    if preset in by_variant:  # each objective minus the preset, paired by seed (same eval images, data order)
        preset_gain = {r["seed"]: r["exact_match_gain"] for r in by_variant[preset]}
        for variant, runs in by_variant.items():
            diffs = [r["exact_match_gain"] - preset_gain[r["seed"]] for r in runs if r["seed"] in preset_gain]
            summary[variant]["minus_preset"] = mean_se(diffs) if len(diffs) > 1 else (math.nan, math.nan)
    if "grpo" in by_variant:
        for variant, runs in by_variant.items():
            summary[variant]["against_grpo"] = against_grpo(runs, by_variant["grpo"])
    return summary


def versus_base(results: list[dict], by_key: dict, steps: int, extra: tuple, derived: dict) -> list[dict]:
    """Each lever or deviation (`derived`: name -> (base, flags)) against its base variant on the seeds both
    have run (the base's runs may come from the archive alone): the final exact match's difference, paired
    by seed (+- the SE over seeds; one seed: the lever's own paired SE over the eval images), and the ratios
    of mean gain per mean rollout TFLOP and per rollout second. `goal`: the cheaper-rollout target, >= 2x the
    gain per rollout TFLOP with the final exact match at most 1 SE lower (None where the rollout costs the same)."""
    rows = []
    for variant in dict.fromkeys(r["variant"] for r in results if r["variant"] in derived):
        base = derived[variant][0]
        pairs = [(r, by_key[key]) for r in results if r["variant"] == variant
                 for key in [(base, r["seed"], tuple(r["knob"]), steps, tuple(extra), r.get("defaults", 1))] if key in by_key]
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
        same_cost = all(abs(r["rollout_tflop"] - b["rollout_tflop"]) <= 1e-6 * b["rollout_tflop"] for r, b in pairs)
        rows.append({"variant": variant, "base": base, "seeds": sorted(r["seed"] for r, _ in pairs),
                     "gain": statistics.fmean(r["exact_match_gain"] for r, _ in pairs),
                     "base_gain": statistics.fmean(b["exact_match_gain"] for _, b in pairs),
                     "rollout_tflop_frac": statistics.fmean(r["rollout_tflop"] / b["rollout_tflop"] for r, b in pairs),
                     "final_diff": diff, "final_diff_se": diff_se, "gain_per_rollout_tflop_ratio": per_tflop,
                     "gain_per_rollout_second_ratio": ratio("rollout_seconds"),
                     # a deviation, not a cheaper rollout: the goal does not apply
                     "goal": None if same_cost else bool(per_tflop >= 2 and diff >= -diff_se)})
    return rows


# ---- The tuning protocol, fixed before any of its runs. The rule: every objective gets the same search,
# coordinate-wise, each stage centred on the previous stage's winner:
#   1. learning_rate = centre x LR_GRID (a 10x range), at the official knob and the current updates per rollout;
#   2. updates_per_rollout in (the current value; 1: one optimizer step per rollout batch, DGPO's and AWM's official
#      count; every value is one pass under the group objectives' disjoint split), at stage 1's lr;
#   3. the main knob = official x KNOB_GRID, at the chosen lr and updates;
# 6 distinct configurations per objective, each run on every TUNING_SEED (never reported). Score: the mean
# over the tuning seeds of the mean exact match of the run's last two evals (tuning_score); the highest
# wins each stage (a tie: the stage's first configuration, its centre: the incumbent stays). Then two arms
# on REPORT_SEEDS: `official` (the official knob, one pass, the centre lr: the papers' learning rates are
# for full-size models, not this world) and `tuned` (the stage-3 winner).
TUNING_SEEDS = (100, 101)
REPORT_SEEDS = (0, 1, 2, 3, 4)
LR_GRID = (1.0, 0.3, 3.0)  # the centre first: a tie keeps it
KNOB_GRID = (1.0, 0.1, 10.0)
# variant: (centre learning rate = its current one, current updates per rollout, main knob, its official value)
PROTOCOL = {
    # beta 100: VeRL-Omni's online Qwen-Image DPO recipe (Wallace et al.'s 5000 is offline full fine-tuning);
    # the moving reference (TR-DPO), adopted in the text_world preset; it moves every 10 rollout steps at any
    # updates per rollout (compare_objectives.config_flags)
    "top_bottom_trdpo": (5e-4, 4, "beta", 100.0),
    "dgpo": (5e-4, 4, "dgpo_beta", 100.0),  # official train.beta_dpo
    "nft": (5e-4, 4, "nft_beta", 0.1),  # official config.beta (OCR)
    "awm": (5e-4, 4, "awm_old_kl_weight", 1.0),  # official train.ema_beta
    # Flow-GRPO-Fast (compare_objectives.VARIANTS): its official KL weight is 0, so the knob is the clip range
    # (official Fast configs: 1e-5); lr 1e-3: its seed-0 sweep under the old defaults
    "grpo": (1e-3, 2, "grpo_clip_range", 1e-5),
}


def canonical(x: float) -> float:  # one spelling of a grid value: 0.3 * 5e-4 is 0.00015, as in a run's flags
    return float(f"{x:g}")


def protocol_plan(variant: str, score) -> tuple[list[list[tuple]], tuple | None]:
    """(the stages reached so far, each a list of (lr, updates, knob value), and the winner or None):
    a stage is reached once every configuration of the one before has a score (`score(config)` -> float or
    None while its tuning runs are missing)."""
    centre, updates, _, official = PROTOCOL[variant]
    stages = [[(canonical(centre * g), updates, official) for g in LR_GRID]]
    for nxt in (lambda lr, _u, _k: [(lr, updates, official), (lr, 1, official)],
                lambda lr, u, _k: [(lr, u, canonical(official * g)) for g in KNOB_GRID], None):
        scores = [score(c) for c in stages[-1]]
        if any(s is None for s in scores):
            return stages, None
        best = stages[-1][scores.index(max(scores))]
        if nxt is None:
            return stages, best
        stages.append(nxt(*best))


def protocol_configs(stages) -> list[tuple]:
    return list(dict.fromkeys(c for stage in stages for c in stage))


def config_score(variant: str, rows):
    """score(config) for `protocol_plan`: the mean over the tuning seeds of `tuning_score` (None until every
    tuning seed's run is archived); rows(variant, config) -> a run or None per tuning seed."""
    def score(config):
        found = rows(variant, config)
        return None if None in found else statistics.fmean(tuning_score(r) for r in found)
    return score


def protocol_table(variants, rows) -> str:
    """Every tuning configuration's score (per tuning seed in brackets), its stage, and each objective's winner."""
    lines = ["| objective | stage | learning rate | updates / rollout | knob | score (per tuning seed) | chosen |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for variant in variants:
        score = config_score(variant, rows)
        stages, winner = protocol_plan(variant, score)
        seen = set()
        for number, stage in enumerate(stages, 1):
            for config in [c for c in stage if c not in seen]:
                seen.add(config)
                per_seed = ", ".join("-" if r is None else f"{tuning_score(r):.3f}" for r in rows(variant, config))
                value = score(config)
                lines.append(f"| {variant} | {number} | {config[0]:g} | {config[1]} | {PROTOCOL[variant][2]} {config[2]:g} "
                             f"| {'-' if value is None else f'{value:.3f}'} ({per_seed}) | {'**yes**' if config == winner else ''} |")
        if winner is None:
            lines.append(f"| {variant} | - | - | - | - | not finished: stage {len(stages)} lacks runs | |")
    return "\n".join(lines)


# The official scripts' optimizer steps per rollout batch, each a disjoint part of it (docs/objectives.md,
# "optimizer steps per rollout batch"): DGPO and AWM's OCR recipe 1, NFT's OCR recipe and Flow-GRPO 2;
# online DPO 1 (one pass: VeRL-Omni uses each pair once)
OFFICIAL_UPDATES = {"top_bottom_trdpo": 1, "dgpo": 1, "nft": 2, "awm": 1, "grpo": 2}


def official_config(variant: str) -> tuple:
    """The official arm: the current learning rate, the official optimizer steps per rollout batch, the official knob."""
    return PROTOCOL[variant][0], OFFICIAL_UPDATES[variant], PROTOCOL[variant][3]


# ---- tables

def plus_minus(value: float, se: float, sign: str = "+") -> str:
    return f"{value:{sign}.3f}" + ("" if se is None or math.isnan(se) else f" ± {se:.3f}")


def ratio_text(value, bounds) -> str:
    """'2.05 [1.10, 4.00]'; 'not reached' for 0 (the target never reached); '-' for NaN."""
    if value is None or math.isnan(value):
        return "-"
    text = "not reached" if value == 0 else f"{value:.2f}"
    return text + ("" if math.isnan(bounds[0]) else f" [{bounds[0]:.2f}, {bounds[1]:.2f}]")


def against_grpo_cells(s: dict) -> str:
    g = s.get("against_grpo")
    if g is None:
        return "- | - | -"
    reach = " / ".join("-" if i is None else f"{i:.0f}" for i in g["images_to_target_by_seed"])
    by_seed = " / ".join("-" if theirs <= 0 else f"{mine / theirs:.2f}" for mine, theirs in zip(g["area_by_seed"], g["grpo_area_by_seed"]))
    return (f"{reach} | {ratio_text(g['fewer_images'], g['fewer_images_ci'])} "
            f"| {ratio_text(g['area_ratio'], g['area_ratio_ci'])}{'' if g['prompts_resampled'] else ' (seeds only: old rows)'}; "
            f"by seed {by_seed}")


def table(summary: dict, preset: str = "top_bottom") -> str:
    """Markdown table; ± is the standard error over seeds, or for a one-seed variant the run's own (its kind named)."""
    lines = ["| objective (knob, flags) | exact-match gain by seed | exact-match gain | reward gain | final exact match | gain / 1k images | "
             "minus preset's gain (paired by seed) | gain / rollout PFLOP | rollout s | train s | collapsed (seed: step, drop) "
             "| images to GRPO's target by seed | x fewer images than GRPO [95% CI] | area under the gain curve / GRPO's [95% CI]; by seed |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for variant, s in summary.items():
        kind = "" if s["se_kind"] == "over seeds" else f" ({s['se_kind']})"
        flags = "".join(f", {f[2:]} {v}" for f, v in zip(s["extra"][::2], s["extra"][1::2]))
        lines.append(
            f"| {variant} ({s['knob'][0]} {s['knob'][1]:g}{flags}) | {' / '.join(f'{g:+.3f}' for g in s['exact_match_gain_by_seed'])} "
            f"| {plus_minus(s['exact_match_gain'], s['exact_match_gain_se'])}{kind} "
            f"| {plus_minus(s['reward_gain'], s['reward_gain_se'])} | {plus_minus(s['final_exact_match'], s['final_exact_match_se'], '')} "
            f"| {1000 * s['gain_per_images']:+.4f} "
            f"| {'-' if variant == preset or math.isnan(s.get('minus_preset', (math.nan,))[0]) else plus_minus(*s['minus_preset'])} "
            f"| {1000 * s['gain_per_rollout_tflop']:+.3f} | {s['rollout_seconds']:.0f} | {s['train_seconds']:.0f} "
            f"| {', '.join(f'{k}: {v[0]} (-{v[1]:.3f})' for k, v in s['collapsed'].items()) or 'none'} "
            f"| {against_grpo_cells(s)} |")
    return "\n".join(lines)


def versus_table(rows: list[dict]) -> str:
    lines = ["| variant (vs base) | seeds | exact-match gain (base's) | rollout TFLOP vs base | final exact match - base's "
             "| gain per rollout TFLOP vs base | per rollout second | >= 2x per TFLOP, final >= -1 SE |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['variant']} (vs {r['base']}) | {', '.join(map(str, r['seeds']))} | {r['gain']:+.3f} ({r['base_gain']:+.3f}) "
                     f"| {r['rollout_tflop_frac']:.2f} | {plus_minus(r['final_diff'], r['final_diff_se'])} "
                     f"| {r['gain_per_rollout_tflop_ratio']:.2f} | {r['gain_per_rollout_second_ratio']:.2f} | {'-' if r['goal'] is None else 'yes' if r['goal'] else 'no'} |")
    return "\n".join(lines)
