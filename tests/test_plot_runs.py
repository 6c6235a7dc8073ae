"""benchmarks/plot_runs.py on a real tiny run: the curves it plots are the run's eval rows, runs
sharing a label average with the standard error over runs, and the pictures are written."""

import json
import math
import os
import statistics
import sys

import pytest
from PIL import Image

import train_online_dpo
from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import plot_runs  # noqa: E402


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("plot") / "run")
    train_online_dpo.main(["--preset", "cpu_tiny", "--output_dir", out, "--max_steps", "4", "--eval_every", "2",
                           "--checkpoint_every", "0", "--log_with", "none"])
    return out


def logged_evals(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [row for row in map(json.loads, f) if "eval/reward_mean" in row]


@pytest.mark.slow
def test_curves_are_the_runs_eval_rows_and_the_pictures_are_written(tiny_run, tmp_path):
    rows = logged_evals(tiny_run)
    steps, values, ses = plot_runs.run_curves(tiny_run)["eval/reward_mean"]
    assert steps == [0, 2, 4] == [row["step"] for row in rows]
    assert values == [row["eval/reward_mean"] for row in rows]
    # the logged SE is that of the per-image rewards the row also holds
    for row, se in zip(rows, ses):
        rewards = row["eval/rewards"]
        assert se == pytest.approx(statistics.stdev(rewards) / math.sqrt(len(rewards)), rel=1e-9)
    assert "eval/exact_match" not in plot_runs.run_curves(tiny_run)  # brightness: no exact match panel

    out = str(tmp_path / "curves.png")
    assert plot_runs.main([tiny_run, "--out", out]) == 0
    assert Image.open(out).size == (500, 360)  # one panel (reward), 5.0 x 3.6 inches at 100 dpi

    grid_out = str(tmp_path / "grid.png")
    assert plot_runs.main([tiny_run, "--grid", "--out", grid_out]) == 0
    first = Image.open(os.path.join(tiny_run, "samples", "eval-000000.png"))
    last = Image.open(os.path.join(tiny_run, "samples", "eval-000004.png"))
    assert Image.open(grid_out).size == (first.width + 16 + last.width, max(first.height, last.height) + 24)
    # the right half is the last eval's grid, pixel for pixel
    picture = Image.open(grid_out).convert("RGB")
    right = picture.crop((first.width + 16, 24, first.width + 16 + last.width, 24 + last.height))
    assert right.tobytes() == last.convert("RGB").tobytes()


def write_run(run_dir, evals):
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        for step, reward, exact in evals:
            f.write(json.dumps({"step": step, "dpo/loss": 0.69}) + "\n")  # a training row: not a curve point
            f.write(json.dumps({"step": step, "eval/reward_mean": reward, "eval/reward_se": 0.01,
                                "eval/exact_match": exact, "eval/exact_match_se": 0.02}) + "\n")


def test_runs_sharing_a_label_average_with_the_standard_error_over_runs(tmp_path):
    seeds = [[(0, 0.60, 0.30), (20, 0.70, 0.40)],
             [(0, 0.62, 0.34), (20, 0.66, 0.44)],
             [(0, 0.64, 0.32), (20, 0.75, 0.54), (40, 0.80, 0.60)]]  # the third run went on to step 40
    dirs = [str(tmp_path / f"seed{i}") for i in range(3)]
    for run_dir, evals in zip(dirs, seeds):
        write_run(run_dir, evals)
    steps, means, ses = plot_runs.label_curves(dirs)["eval/exact_match"]
    assert steps == [0, 20, 40]
    assert means == pytest.approx([0.32, (0.40 + 0.44 + 0.54) / 3, 0.60])
    assert ses[1] == pytest.approx(statistics.stdev([0.40, 0.44, 0.54]) / math.sqrt(3))
    assert ses[2] == 0.02  # one run reached step 40: its own eval SE

    groups = plot_runs.group_runs(dirs + [str(tmp_path / "seed0")], ["dpo", "dpo", "dpo", "alone"])
    assert list(groups) == ["dpo", "alone"] and len(groups["dpo"]) == 3
    out = str(tmp_path / "two.png")
    plotted = plot_runs.plot_curves(groups, out)
    assert Image.open(out).size == (1000, 360)  # exact match and reward panels
    assert plotted["alone"]["eval/reward_mean"][1] == [0.60, 0.70]
    with pytest.raises(ValueError, match="2 labels for 3 runs"):
        plot_runs.group_runs(dirs, ["a", "b"])
    assert plot_runs.main([str(tmp_path / "nowhere"), "--out", out]) == 2


def test_training_metrics_get_a_panel_each_with_the_mean_over_a_labels_runs(tmp_path):
    dirs = [str(tmp_path / f"seed{i}") for i in range(2)]
    for run_dir, loss in zip(dirs, (0.6, 0.8)):
        os.makedirs(run_dir)
        with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
            for step in (1, 2):
                f.write(json.dumps({"step": step, "dpo/loss": loss * step}) + "\n")
            f.write(json.dumps({"step": 2, "dpo/loss": loss * 10}) + "\n")  # a repeated step (a resume): the last wins
            for step in (0, 2):
                f.write(json.dumps({"step": step, "eval/reward_mean": 0.5, "eval/reward_se": 0.01, "dpo/loss": 99}) + "\n")
    assert plot_runs.train_series(dirs, "dpo/loss") == ([1, 2], [pytest.approx(0.7), pytest.approx(7.0)])
    out = str(tmp_path / "curves.png")
    assert plot_runs.main(dirs + ["--label", "a", "a", "--train_metrics", "dpo/loss", "--out", out]) == 0
    assert Image.open(out).size == (1000, 360)  # the reward panel and the loss panel
    with pytest.raises(ValueError, match="--train_metrics dpo/nothing: no run of"):
        plot_runs.train_series(dirs, "dpo/nothing")
