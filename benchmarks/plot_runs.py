"""Pictures of training runs: learning curves, and an eval grid before / after.

    python benchmarks/plot_runs.py RUN_DIR [RUN_DIR ...] --out curves.png [--label NAME ...]
    python benchmarks/plot_runs.py RUN_DIR --grid --out before_after.png [--grid_rows 2] [--grid_scale 0.5] [--colors 64]

Curves: eval reward and (with an OCR reward) eval exact match against the step, from the eval rows
of each run's metrics.jsonl, with a band of one standard error. A run alone is drawn with its own
eval's standard error (over the eval images). Runs that share a --label (e.g. seeds of one
configuration) are averaged step by step over the runs that reached that step, and the band is the
standard error over the runs (the seed-to-seed spread, which is what a comparison has to beat).
Without --label each run is its own curve, named after its folder.

--train_metrics KEY [KEY ...]: a panel per logged per-step metric after the eval panels (e.g. online
DPO's diagnostics `dpo/implicit_reward_margin update/grad_norm dpo/chosen_err_above_ref`, to see
which moves before the eval falls), each label's line the mean over its runs at each step, no band.

--grid: the run's first and last eval grids (samples/eval-STEP.png: the same prompts and seeds at
both steps) side by side, each captioned with its step and eval figures.

Reads metrics.jsonl and the PNG files only: no torch, no model.
"""

import argparse
import json
import math
import os
import statistics
import sys

import matplotlib

matplotlib.use("Agg")  # files only, never a window
import matplotlib.pyplot as plt  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

# (metrics key, its standard-error key, axis title); exact match only exists for OCR rewards
CURVE_KEYS = [("eval/exact_match", "eval/exact_match_se", "eval exact match"),
              ("eval/reward_mean", "eval/reward_se", "eval mean reward")]


def eval_rows(run_dir: str) -> list[dict]:
    """The eval rows of run_dir/metrics.jsonl in step order (the last row of a step wins, as after a
    resume that repeated it). The same rows as run_logs.eval_history, read without importing
    the trainer (and with it torch and diffusers)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics.jsonl (is {run_dir} a training run's output_dir?)")
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                if "eval/reward_mean" in row:
                    by_step[row["step"]] = row
    if not by_step:
        raise ValueError(f"{path}: no eval rows (was the run started with --eval_every 0?)")
    return [by_step[step] for step in sorted(by_step)]


def run_curves(run_dir: str) -> dict:
    """-> {metrics key: (steps, values, standard errors)} for each CURVE_KEYS metric the run logged:
    the values are the eval rows' own figures, the errors their logged standard errors (0 when a row
    has none, e.g. a 1-image eval)."""
    rows = eval_rows(run_dir)
    curves = {}
    for key, se_key, _ in CURVE_KEYS:
        kept = [row for row in rows if key in row]
        if kept:
            curves[key] = ([row["step"] for row in kept], [row[key] for row in kept], [row.get(se_key, 0.0) for row in kept])
    return curves


def label_curves(run_dirs: list[str]) -> dict:
    """Several runs of one configuration -> {metrics key: (steps, means, standard errors)}: at each
    step the mean over the runs that logged it, and the standard error of that mean over runs
    (sample std / sqrt(n); a step only one run reached keeps that run's own eval SE)."""
    if len(run_dirs) == 1:
        return run_curves(run_dirs[0])
    per_run = [run_curves(d) for d in run_dirs]
    curves = {}
    for key, _, _ in CURVE_KEYS:
        at_step = {}
        for curves_of_run in per_run:
            if key in curves_of_run:
                for step, value, se in zip(*curves_of_run[key]):
                    at_step.setdefault(step, []).append((value, se))
        if not at_step:
            continue
        steps = sorted(at_step)
        means = [statistics.fmean(v for v, _ in at_step[s]) for s in steps]
        ses = [statistics.stdev(v for v, _ in at_step[s]) / math.sqrt(len(at_step[s])) if len(at_step[s]) > 1
               else at_step[s][0][1] for s in steps]
        curves[key] = (steps, means, ses)
    return curves


def train_series(run_dirs: list[str], key: str) -> tuple[list[int], list[float]]:
    """A per-step training metric (rows without an eval) -> (steps, the mean over the runs that logged
    it at each step); the last row of a step wins, as in eval_rows."""
    at_step: dict[int, list[float]] = {}
    for run_dir in run_dirs:
        by_step = {}
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            for row in map(json.loads, filter(str.strip, f)):
                if key in row and "eval/reward_mean" not in row:
                    by_step[row["step"]] = row[key]
        for step, value in by_step.items():
            at_step.setdefault(step, []).append(value)
    if not at_step:
        raise ValueError(f"--train_metrics {key}: no run of {', '.join(run_dirs)} logged it")
    steps = sorted(at_step)
    return steps, [statistics.fmean(at_step[s]) for s in steps]


def group_runs(run_dirs: list[str], labels: list[str] | None) -> dict:
    """-> {label: [run dirs]} in first-seen order; without labels each run is named after its folder."""
    if labels and len(labels) != len(run_dirs):
        raise ValueError(f"--label: {len(labels)} labels for {len(run_dirs)} runs (give one per run, or none)")
    names = labels or [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    groups = {}
    for name, run_dir in zip(names, run_dirs):
        groups.setdefault(name, []).append(run_dir)
    return groups


def plot_curves(groups: dict, out: str, title: str = "", train_metrics: tuple = ()) -> dict:
    """One panel per eval metric (exact match, reward), one line per label with its +-1 SE band, then
    one per training metric (train_series). -> the plotted {label: curves} (training metrics as
    (steps, values, None))."""
    plotted = {label: label_curves(dirs) for label, dirs in groups.items()}
    keys = [k for k in CURVE_KEYS if any(k[0] in c for c in plotted.values())]
    for key in train_metrics:
        for label, dirs in groups.items():
            plotted[label][key] = (*train_series(dirs, key), None)
    panels = len(keys) + len(train_metrics)
    columns = min(panels, 3)
    rows = math.ceil(panels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.0 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    for ax, key in zip(axes.flat[len(keys):], train_metrics):
        for label, curves in plotted.items():
            ax.plot(*curves[key][:2], marker=".", label=label)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax, (key, _, axis_title) in zip(axes.flat, keys):
        for label, curves in plotted.items():
            if key not in curves:
                continue
            steps, values, ses = curves[key]
            n = len(groups[label])
            line, = ax.plot(steps, values, marker="o", label=label + (f" ({n} runs)" if n > 1 else ""))
            ax.fill_between(steps, [v - s for v, s in zip(values, ses)], [v + s for v, s in zip(values, ses)],
                            color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("step")
        ax.set_ylabel(axis_title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or "eval vs step (band: +-1 standard error)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return plotted


def eval_caption(row: dict) -> str:
    text = f"step {row['step']}: reward {row['eval/reward_mean']:.3f} +- {row.get('eval/reward_se', 0.0):.3f}"
    if "eval/exact_match" in row:
        text += f", exact match {row['eval/exact_match']:.3f} +- {row.get('eval/exact_match_se', 0.0):.3f}"
    return text + f" ({int(row.get('eval/images', 0))} images)"


def plot_grid(run_dir: str, out: str, rows: int = 0, scale: float = 1.0, colors: int = 0,
              tile_row_height: int = 142) -> tuple[int, int]:
    """The first and last eval grids of a run side by side, each under its caption (step and eval
    figures from metrics.jsonl). rows > 0 keeps only the first `rows` rows of each grid (the eval
    grids are rows of 8 tiles of 128 px under a 14 px caption line: run_logs.image_grid); scale
    resizes each grid; colors > 0 stores the picture with that many palette colours (a PNG for docs:
    a third of the bytes, the glyphs unchanged to the eye). -> (first step, last step)."""
    samples = os.path.join(run_dir, "samples")
    grids = sorted(f for f in os.listdir(samples) if f.startswith("eval-") and f.endswith(".png")) \
        if os.path.isdir(samples) else []
    if len(grids) < 2:
        raise ValueError(f"{samples}: needs at least two eval grids (eval-STEP.png), found {len(grids)}")
    first_step, last_step = (int(grids[i][len("eval-"):-len(".png")]) for i in (0, -1))
    by_step = {row["step"]: row for row in eval_rows(run_dir)}
    panels = []
    for name, step in ((grids[0], first_step), (grids[-1], last_step)):
        image = Image.open(os.path.join(samples, name)).convert("RGB")
        if rows:
            image = image.crop((0, 0, image.width, min(image.height, rows * tile_row_height)))
        if scale != 1.0:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.LANCZOS)
        caption = eval_caption(by_step[step]) if step in by_step else f"step {step}"
        panel = Image.new("RGB", (image.width, image.height + 24), "white")
        panel.paste(image, (0, 24))
        ImageDraw.Draw(panel).text((4, 6), caption, fill="black")
        panels.append(panel)
    gap = 16
    picture = Image.new("RGB", (panels[0].width + gap + panels[1].width, max(p.height for p in panels)), "white")
    picture.paste(panels[0], (0, 0))
    picture.paste(panels[1], (panels[0].width + gap, 0))
    if colors:
        picture = picture.quantize(colors)
    picture.save(out, optimize=True)
    return first_step, last_step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", help="training runs' output_dir folders (with metrics.jsonl)")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--label", nargs="+", default=None,
                        help="one label per run; runs sharing a label are averaged (SE over runs)")
    parser.add_argument("--title", default="", help="figure title (curves)")
    parser.add_argument("--train_metrics", nargs="+", default=[], metavar="KEY",
                        help="curves: a panel per logged per-step metric after the eval panels (mean over a label's runs)")
    parser.add_argument("--grid", action="store_true", help="before/after eval grids of one run instead of curves")
    parser.add_argument("--grid_rows", type=int, default=0, help="--grid: keep the first N rows of each grid (0 = all)")
    parser.add_argument("--grid_scale", type=float, default=1.0, help="--grid: resize each grid by this factor")
    parser.add_argument("--colors", type=int, default=0, help="--grid: palette colours of the PNG (0 = full colour)")
    args = parser.parse_args(argv)
    try:
        if args.grid:
            if len(args.run_dirs) != 1:
                raise ValueError("--grid takes one run")
            first, last = plot_grid(args.run_dirs[0], args.out, rows=args.grid_rows, scale=args.grid_scale,
                                    colors=args.colors)
            print(f"{args.out}: eval grids of step {first} and step {last}")
        else:
            plotted = plot_curves(group_runs(args.run_dirs, args.label), args.out, args.title, tuple(args.train_metrics))
            for label, curves in plotted.items():
                for key, (steps, values, ses) in curves.items():
                    if ses is None:  # a training metric: one value a step, printed in a line of its own
                        print(f"{label} {key}: " + ", ".join(f"{s}: {v:.4g}" for s, v in zip(steps, values)))
                    else:
                        print(f"{label} {key}: " + ", ".join(f"{s}: {v:.3f} +- {e:.3f}" for s, v, e in zip(steps, values, ses)))
            print(f"wrote {args.out}")
    except (OSError, ValueError) as error:
        print(f"plot_runs.py: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
