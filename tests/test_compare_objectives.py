"""benchmarks/compare_objectives.py's arithmetic on run folders written here: the gains and their
standard errors over seeds, the collapse rule (an eval more than 2 paired SEs below the start) and the
"x fewer rollout images than GRPO" factor, each against values worked out by hand."""

import json
import math
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import compare_objectives as co  # noqa: E402

PROMPTS, SAMPLES = 2, 4  # 8 rollout images a step


def write_run(folder, exact_matches, paired_se=0.01, eval_every=10, rollout_tflop=0.5):
    """A run folder as train_online_dpo writes it: config.json and metrics.jsonl (train rows, eval rows)."""
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({"prompts_per_step": PROMPTS, "samples_per_prompt": SAMPLES}, f)
    steps = eval_every * (len(exact_matches) - 1)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for step in range(steps + 1):
            if step < steps:
                f.write(json.dumps({"step": step + 1, "time/rollout_s": 1.0, "time/reward_s": 0.5, "time/update_s": 0.5,
                                    "perf/rollout_tflop": rollout_tflop, "perf/update_tflop": 0.1}) + "\n")
            if step % eval_every == 0:
                em = exact_matches[step // eval_every]
                f.write(json.dumps({"step": step, "eval/reward_mean": em / 2, "eval/exact_match": em,
                                    "eval/exact_match_gain_se": paired_se}) + "\n")


def summary_of(tmp_path, runs):
    results = []
    for variant, seed, curve, kwargs in runs:
        folder = str(tmp_path / f"{variant}-s{seed}")
        write_run(folder, curve, **kwargs)
        assert co.finished(folder, 10 * (len(curve) - 1))
        results.append(co.result(variant, seed, ("knob", 1.0), folder))
    return results, co.summarise(results)


def test_gains_per_cost_and_standard_errors_over_seeds(tmp_path):
    results, summary = summary_of(tmp_path, [("nft", 0, [0.3, 0.4, 0.5], {}), ("nft", 1, [0.3, 0.35, 0.4], {})])
    s = summary["nft"]
    assert s["exact_match_gain"] == pytest.approx(0.15)
    assert s["exact_match_gain_se"] == pytest.approx(math.sqrt(0.005) / math.sqrt(2))  # stdev of 0.2, 0.1 over sqrt 2
    assert s["images"] == 20 * PROMPTS * SAMPLES
    assert s["rollout_tflop"] == pytest.approx(20 * 0.5)
    assert s["gain_per_rollout_tflop"] == pytest.approx(0.15 / 10)
    assert s["train_seconds"] == pytest.approx(20 * 2.0)
    assert s["rollout_seconds"] == pytest.approx(20 * 1.0) and s["gain_per_rollout_seconds"] == pytest.approx(0.15 / 20)
    assert s["curve"] == [(0, pytest.approx(0.3), 0.0), (80, pytest.approx(0.375), pytest.approx(0.025)),
                          (160, pytest.approx(0.45), pytest.approx(0.05))]
    assert s["collapsed"] == {}
    assert s["exact_match_gain_by_seed"] == [pytest.approx(0.2), pytest.approx(0.1)]


def test_collapse_is_the_first_eval_more_than_two_paired_ses_below_the_start(tmp_path):
    results, summary = summary_of(tmp_path, [("dgpo", 0, [0.3, 0.29, 0.25, 0.1], {"paired_se": 0.02}),
                                             ("dgpo", 1, [0.3, 0.27, 0.3, 0.3], {"paired_se": 0.02})])
    # seed 0: -0.01 (0.5 SE), then -0.05 (2.5 SE): step 20; seed 1: -0.03 is 1.5 SE, never collapses
    assert summary["dgpo"]["collapsed"] == {0: 20}


def test_fewer_rollout_images_than_grpo_to_reach_its_final_exact_match(tmp_path):
    results, summary = summary_of(tmp_path, [("grpo", 0, [0.3, 0.32, 0.34, 0.36], {}),
                                             ("awm", 0, [0.3, 0.45, 0.5, 0.5], {}),
                                             ("dpo", 0, [0.3, 0.31, 0.32, 0.33], {})])
    # grpo reaches its own final 0.36 at step 30 = 240 images; awm crosses 0.36 at 0.4 of its first
    # interval (0.3 -> 0.45 over 80 images): 32 images, so 240 / 32 = 7.5x; dpo never gets there
    assert summary["grpo"]["images_to_grpo_final"] == pytest.approx(240)
    assert summary["grpo"]["fewer_images_than_grpo"] == pytest.approx(1.0)
    assert summary["awm"]["images_to_grpo_final"] == pytest.approx(32)
    assert summary["awm"]["fewer_images_than_grpo"] == pytest.approx(7.5)
    assert summary["dpo"]["fewer_images_than_grpo"] is None
    assert summary["awm"]["curve"][1][2] == pytest.approx(0.01)  # one seed: the band is the run's paired SE
    assert summary["awm"]["exact_match_gain_se"] == pytest.approx(0.01)  # and so is the gain's
    assert "not reached" in co.table(summary) and "7.50" in co.table(summary)


def compare(monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["compare_objectives.py", "--variants", "nft", "--seeds", "0", "1",
                                      "--steps", "20", "--summary_only", *argv])
    co.main()


def test_the_archive_keeps_finished_runs_across_lost_workdirs_and_a_rerun_replaces_its_row(tmp_path, monkeypatch):
    archive, knob = str(tmp_path / "archive.jsonl"), (co.KNOBS["nft"][0], co.KNOBS["nft"][1])
    for seed, curve in ((0, [0.3, 0.4, 0.5]), (1, [0.3, 0.35, 0.4])):
        write_run(str(tmp_path / "a" / co.run_name("nft", seed, knob)), curve)
    compare(monkeypatch, "--workdir", str(tmp_path / "a"), "--archive", archive, "--json", str(tmp_path / "a.json"))
    assert [json.loads(line)["seed"] for line in open(archive)] == [0, 1]
    # the run folders are gone: the archive alone gives the same summary
    compare(monkeypatch, "--workdir", str(tmp_path / "empty"), "--archive", archive, "--json", str(tmp_path / "b.json"))
    first, again = (json.load(open(tmp_path / name))["summary"]["nft"] for name in ("a.json", "b.json"))
    assert again == first and first["exact_match_gain"] == pytest.approx(0.15)
    # seed 1 re-run (a new workdir): its row is replaced, seed 0 stays
    write_run(str(tmp_path / "c" / co.run_name("nft", 1, knob)), [0.3, 0.3, 0.2])
    compare(monkeypatch, "--workdir", str(tmp_path / "c"), "--archive", archive, "--json", str(tmp_path / "c.json"))
    rows = [json.loads(line) for line in open(archive)]
    assert [(r["seed"], r["exact_match_gain"]) for r in rows] == [(0, pytest.approx(0.2)), (1, pytest.approx(-0.1))]
    assert json.load(open(tmp_path / "c.json"))["summary"]["nft"]["exact_match_gain"] == pytest.approx(0.05)
    # without --archive only the workdir counts; other steps or extra flags are other runs
    compare(monkeypatch, "--workdir", str(tmp_path / "c"), "--json", str(tmp_path / "d.json"))
    assert json.load(open(tmp_path / "d.json"))["summary"]["nft"]["seeds"] == [1]
    monkeypatch.setattr(sys, "argv", ["compare_objectives.py", "--variants", "nft", "--seeds", "0", "1", "--steps", "30",
                                      "--summary_only", "--workdir", str(tmp_path / "empty"), "--archive", archive,
                                      "--json", str(tmp_path / "e.json")])
    co.main()
    assert json.load(open(tmp_path / "e.json"))["summary"] == {}


def test_a_broken_archive_line_is_named(tmp_path, monkeypatch):
    archive = tmp_path / "archive.jsonl"
    archive.write_text('{"variant": "nft"}\n{"variant": \n')
    with pytest.raises(SystemExit, match=r"archive.jsonl line 2: not a JSON run result"):
        compare(monkeypatch, "--workdir", str(tmp_path / "empty"), "--archive", str(archive))


FAKE_RUN = """import json, os, sys
out, archive, em = sys.argv[1], sys.argv[2], float(sys.argv[3])
os.makedirs(out)
json.dump({"prompts_per_step": 2, "samples_per_prompt": 4}, open(os.path.join(out, "config.json"), "w"))
seeds_archived = [json.loads(line)["seed"] for line in open(archive)] if os.path.exists(archive) else []
with open(os.path.join(out, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"step": 0, "eval/reward_mean": 0.1, "eval/exact_match": 0.3, "eval/rewards": [],
                        "archived_at_start": seeds_archived}) + "\\n")
    for step in range(1, 21):
        f.write(json.dumps({"step": step, "time/rollout_s": 1.0, "time/reward_s": 0.5, "time/update_s": 0.5}) + "\\n")
        if step % 10 == 0:
            f.write(json.dumps({"step": step, "eval/reward_mean": 0.2, "eval/exact_match": em}) + "\\n")
"""


def test_a_comparison_runs_only_what_the_archive_lacks_and_archives_each_run_as_it_ends(tmp_path, monkeypatch):
    """The scheduler with real processes in place of the trainer (each writes a run folder as it would)."""
    archive, knob = str(tmp_path / "archive.jsonl"), (co.KNOBS["nft"][0], co.KNOBS["nft"][1])
    write_run(str(tmp_path / "old" / co.run_name("nft", 0, knob)), [0.3, 0.4, 0.5])
    compare(monkeypatch, "--workdir", str(tmp_path / "old"), "--archive", archive)  # seed 0 archived
    fake = tmp_path / "fake_run.py"
    fake.write_text(FAKE_RUN)
    started = []

    def command(variant, seed, knob, out, steps, eval_every, baseline, extra):
        started.append((seed, baseline))
        return [sys.executable, str(fake), out, archive, str(0.3 + 0.1 * seed)]

    monkeypatch.setattr(co, "command", command)
    monkeypatch.setattr(sys, "argv", ["compare_objectives.py", "--variants", "nft", "--seeds", "0", "1", "2",
                                      "--steps", "20", "--jobs", "1", "--workdir", str(tmp_path / "new"),
                                      "--archive", archive, "--json", str(tmp_path / "s.json")])
    co.main()
    first_new = str(tmp_path / "new" / co.run_name("nft", 1, knob))
    assert started == [(1, ""), (2, first_new)]  # seed 0 not run again; the first new run is the baseline
    seed2 = co.read_rows(str(tmp_path / "new" / co.run_name("nft", 2, knob)))
    assert seed2[0]["archived_at_start"] == [0, 1]  # seed 1 was archived when it ended, before seed 2 began
    summary = json.load(open(tmp_path / "s.json"))["summary"]["nft"]
    assert summary["seeds"] == [0, 1, 2]
    assert summary["exact_match_gain"] == pytest.approx((0.2 + 0.1 + 0.2) / 3)


def test_a_lever_against_its_base_paired_by_seed(tmp_path):
    """Gain per rollout TFLOP vs the base, the final exact match's difference paired by seed, and the goal."""
    results, _ = summary_of(tmp_path, [("top_bottom", 0, [0.3, 0.4, 0.5], {}), ("top_bottom", 1, [0.3, 0.35, 0.4], {}),
                                       ("top_bottom_steps4", 0, [0.3, 0.4, 0.45], {"rollout_tflop": 0.2}),
                                       ("top_bottom_steps4", 1, [0.3, 0.35, 0.45], {"rollout_tflop": 0.2}),
                                       ("nft_drop_tied", 0, [0.3, 0.3, 0.35], {}), ("nft", 0, [0.3, 0.3, 0.3], {}),
                                       ("awm_drop_tied", 1, [0.3, 0.3, 0.3], {}), ("awm", 0, [0.3, 0.3, 0.3], {})])
    by_key = {co.archive_key(dict(r, steps=20, extra=[])): r for r in results}
    derived = [r for r in results if r["variant"] in co.DERIVED]
    cheap, tied = co.versus_base(derived, by_key, 20, ())  # awm_drop_tied: no awm run on its seed, no row
    # base: gains 0.2, 0.1 over 10 TFLOP each; lever: 0.15, 0.15 over 4 TFLOP: (0.15 / 4) / (0.15 / 10) = 2.5
    assert cheap["seeds"] == [0, 1] and cheap["gain_per_rollout_tflop_ratio"] == pytest.approx(2.5)
    assert cheap["rollout_tflop_frac"] == pytest.approx(0.4)
    assert cheap["final_diff"] == pytest.approx(0.0) and cheap["final_diff_se"] == pytest.approx(0.05)  # diffs -0.05, +0.05
    assert cheap["goal"] is True
    # one seed: the difference's SE is the run's paired one; the same rollout cost: the goal does not apply
    assert (tied["variant"], tied["final_diff"], tied["final_diff_se"]) == ("nft_drop_tied", pytest.approx(0.05), 0.01)
    assert tied["goal"] is None and math.isnan(tied["gain_per_rollout_tflop_ratio"])  # the base gained nothing
    assert "| top_bottom_steps4 (vs top_bottom) | 0, 1 | +0.150 (+0.150) | 0.40 | +0.000 ± 0.050 | 2.50 |" in co.versus_table(
        [cheap, tied])


def test_each_objective_minus_the_preset_paired_by_seed(tmp_path):
    _, summary = summary_of(tmp_path, [("top_bottom", 0, [0.3, 0.4], {}), ("top_bottom", 1, [0.3, 0.35], {}),
                                       ("nft", 0, [0.3, 0.5], {}), ("nft", 1, [0.3, 0.35], {}), ("awm", 0, [0.3, 0.4], {})])
    # nft - top_bottom: seed 0 +0.1, seed 1 0.0 -> +0.05 +- 0.05; awm has one common seed: no paired SE, not shown
    assert summary["nft"]["minus_preset"] == (pytest.approx(0.05), pytest.approx(0.05))
    assert all(math.isnan(x) for x in summary["awm"]["minus_preset"])
    assert "| +0.050 ± 0.050 |" in co.table(summary)
