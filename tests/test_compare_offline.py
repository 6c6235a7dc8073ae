"""benchmarks/compare_offline.py: real cpu_tiny runs archived as they end, not run again once archived, the
table's numbers as recomputed from the runs' metrics.jsonl, and the same table from the archive alone."""

import json
import math
import os
import re
import shutil
import statistics
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import compare_offline as cof  # noqa: E402


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    """The pairs tests/test_offline.py's `tiny_pairs` builds (that fixture is module-scoped there)."""
    from data_process import make_offline_pairs

    path = str(tmp_path_factory.mktemp("pairs") / "tiny.parquet")
    assert make_offline_pairs.main(["--preset", "cpu_tiny", "--output", path])["pairs"] == 64
    return path


def table_rows(text: str) -> dict[str, list[str]]:
    """{variant: its cells} from the markdown table."""
    rows = [line.strip("|").split("|") for line in text.splitlines() if line.startswith("| ") and "---" not in line]
    return {cells[0].split()[0]: [c.strip() for c in cells] for cells in rows[1:]}


def numbers(cell: str) -> list[float]:
    return [float(x) for x in re.findall(r"[-+]?\d+\.\d+(?:e[-+]?\d+)?", cell)]


def evals(run_dir: str) -> list[dict]:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [r for r in rows if "eval/reward_mean" in r]


@pytest.mark.slow
def test_runs_are_archived_not_rerun_and_the_table_is_the_runs_and_rebuilds_from_the_archive(tiny_pairs, tmp_path, capsys, monkeypatch):
    workdir, archive = str(tmp_path / "work"), str(tmp_path / "offline.jsonl")
    argv = ["--workdir", workdir, "--preset", "cpu_tiny", "--variants", "preset", "rpo10", "--seeds", "0",
            "--archive", archive, "--extra", "--pairs_path", tiny_pairs, "--max_steps", "2", "--eval_every", "2",
            "--checkpoint_every", "0"]
    cof.main(argv)
    out = capsys.readouterr().out
    assert "started preset-s0" in out and "done rpo10-s0" in out
    table = out[out.index("| variant"):].strip()
    rows = [json.loads(line) for line in open(archive)]
    assert sorted((r["variant"], r["seed"]) for r in rows) == [("preset", 0), ("rpo10", 0)]
    for r in rows:  # the curve: both evals, every image's reward
        assert [p["step"] for p in r["curve"]] == [0, 2] and all(len(p["rewards"]) == 64 for p in r["curve"])
        assert r["extra"] == argv[argv.index("--extra") + 1:] and r["config"]["max_steps"] == 2

    monkeypatch.setattr(cof.subprocess, "Popen", lambda *a, **k: pytest.fail("an archived run was started again"))
    cof.main(argv)
    again = capsys.readouterr().out
    assert "started" not in again and again.strip() == table

    # by hand: brightness logs no exact match, so the gain is in mean reward, final eval minus step 0
    curve = {v: [(r["step"], r["eval/reward_mean"]) for r in evals(os.path.join(workdir, f"{v}-s0"))] for v in ("preset", "rpo10")}
    assert curve["preset"][0] == curve["rpo10"][0]  # the same base model and eval images: the same step-0 eval
    gain = {v: c[-1][1] - c[0][1] for v, c in curve.items()}
    assert gain["rpo10"] != gain["preset"]
    cells = table_rows(table)
    for variant in ("preset", "rpo10"):
        _, metric, by_seed, mean, minus, collapsed, curves = cells[variant]
        assert metric == "reward" and collapsed == "0 of 1"
        assert numbers(by_seed) == pytest.approx([gain[variant]], rel=1e-3)
        assert numbers(mean) == pytest.approx([gain[variant]], rel=1e-3)  # one seed: no ±
        assert numbers(curves) == pytest.approx([v for _, v in curve[variant]], rel=1e-3)
    assert cells["preset"][4] == "-"
    assert numbers(cells["rpo10"][4]) == pytest.approx([gain["rpo10"] - gain["preset"]], rel=1e-3)

    shutil.rmtree(workdir)
    cof.main(["--summary_only"] + argv)
    assert capsys.readouterr().out.strip() == table


def run_row(variant: str, seed: int, exact: list[float]) -> dict:
    curve = [{"step": 10 * k, "reward": e, "rewards": [], "exact_match": e} for k, e in enumerate(exact)]
    return {"variant": variant, "seed": seed, "preset": "p", "flags": cof.VARIANTS[variant], "extra": [], "curve": curve}


def test_gains_over_seeds_paired_with_the_preset_and_collapses_from_the_archive(tmp_path, capsys):
    preset = {0: [0.5, 0.6, 0.7], 1: [0.5, 0.55, 0.6], 2: [0.5, 0.5, 0.65]}
    sdpo = {0: [0.5, 0.7, 0.6], 1: [0.5, 0.6, 0.62], 2: [0.5, 0.52, 0.6]}  # seed 0 at step 20: 0.1 below its peak
    archive = str(tmp_path / "a.jsonl")
    rows = [run_row("preset", s, c) for s, c in preset.items()] + [run_row("sdpo", s, c) for s, c in sdpo.items()]
    cof.update_archive(archive, rows, key=cof.row_key)
    cof.main(["--workdir", str(tmp_path / "none"), "--preset", "p", "--variants", "preset", "sdpo", "--archive", archive,
              "--summary_only"])
    cells = table_rows(capsys.readouterr().out)
    gains = [c[-1] - c[0] for c in sdpo.values()]
    diffs = [g - (preset[s][-1] - preset[s][0]) for s, g in zip(sdpo, gains)]
    _, metric, by_seed, mean, minus, collapsed, _ = cells["sdpo"]
    assert metric == "exact match" and numbers(by_seed) == pytest.approx(gains, rel=1e-3)
    for cell, values in ((mean, gains), (minus, diffs)):  # the mean to 4 digits, its SE to 2
        assert numbers(cell)[0] == pytest.approx(statistics.fmean(values), rel=1e-3)
        assert numbers(cell)[1] == pytest.approx(statistics.stdev(values) / math.sqrt(3), rel=5e-2)
    assert collapsed.startswith("1 of 3; s0 at 20") and cells["preset"][5] == "0 of 3"


def test_a_folder_the_script_did_not_make_is_refused_and_kept(tmp_path):
    folder = tmp_path / "work" / "preset-s0"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="did not make it"):
        cof.main(["--workdir", str(tmp_path / "work"), "--variants", "preset", "--seeds", "0", "--preset", "cpu_tiny"])
    assert (folder / "notes.txt").read_text() == "mine"
