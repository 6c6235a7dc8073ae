"""The comparison's pictures (compare_objectives.py --plot and --plot_sensitivity); matplotlib only,
drawn into files."""

import os
import statistics


def plot_curves(summary: dict, path: str, name: str = ""):
    """Eval exact match against rollout images, one line per objective (mean over seeds, band = SE);
    name: what the curves are (a protocol arm), put in the title."""
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
    band = "one seed, band = paired SE over the eval images" if one_seed else "mean, band = SE over seeds (one seed: paired SE)"
    ax.set_title(f"Text world, equal rollout budget{', ' + name if name else ''}:\n{band}", fontsize=10)
    target = (summary.get("grpo", {}).get("against_grpo") or {}).get("target")
    if target is not None:
        ax.axhline(target, color="grey", lw=0.8, ls=":", label="target: GRPO's start + half its gain")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)


def plot_sensitivity(points: dict, tuning_seeds, path: str):
    """Each objective's final exact match against the learning rate ({variant: [(lr, [final per tuning
    seed])]}, compare_objectives.sensitivity_points): every tuning seed a dot and their mean a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for variant, by_lr in points.items():
        if by_lr:
            line, = ax.plot([lr for lr, _ in by_lr], [statistics.fmean(f) for _, f in by_lr], marker="o", label=variant)
            ax.scatter([lr for lr, f in by_lr for _ in f], [x for _, f in by_lr for x in f], s=8, color=line.get_color())
    ax.set_xscale("log")
    rates = sorted({lr for by_lr in points.values() for lr, _ in by_lr})
    ax.set_xticks(rates, [f"{lr:g}" for lr in rates], minor=False)  # the grid's rates, not crowded log ticks
    ax.set_xticks([], minor=True)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final eval exact match")
    ax.set_title(f"Learning-rate sensitivity (tuning seeds {', '.join(map(str, tuning_seeds))}; official knob)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
