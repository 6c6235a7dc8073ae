"""benchmarks/compare_objectives.py and compare_stats.py on run folders and archive rows written here: the
gains and their standard errors (over seeds; clustered by prompt for one run), the collapse rule (an eval
more than COLLAPSE_MARGIN below the run's own peak), the ratios against GRPO with their bootstrap
intervals, the tuning protocol's configurations and arms, and the command's input errors, each against
values worked out by hand or computed independently here."""

import json
import math
import os
import sys
import time

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import compare_objectives as co  # noqa: E402
import compare_stats as cs  # noqa: E402

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


def test_collapse_is_the_first_eval_more_than_the_margin_below_the_runs_own_peak(tmp_path):
    assert cs.COLLAPSE_MARGIN == 0.05
    # seed 0 rises to 0.45, then 0.41 (0.04 below: noise) and 0.38 (0.07 below its peak, still above the
    # start: a start-based rule misses it); seed 1 falls 0.04 from its start and 0.04 from 0.32
    results, summary = summary_of(tmp_path, [("dgpo", 0, [0.3, 0.45, 0.41, 0.38, 0.5], {}),
                                             ("dgpo", 1, [0.3, 0.26, 0.32, 0.28, 0.3], {})])
    assert summary["dgpo"]["collapsed"] == {0: (30, pytest.approx(0.07))}
    assert (results[0]["collapse_step"], results[0]["collapse_drop"]) == (30, pytest.approx(0.07))
    assert results[1]["collapse_step"] is None
    assert "0: 30 (-0.070)" in co.table(summary)


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
                                      "--archive", archive, "--json", str(tmp_path / "s.json"),
                                      "--plot", str(tmp_path / "curves.png")])
    co.main()
    assert os.path.getsize(tmp_path / "curves.png") > 1000
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
    _, summary = summary_of(tmp_path, [("top_bottom_trdpo", 0, [0.3, 0.4], {}), ("top_bottom_trdpo", 1, [0.3, 0.35], {}),
                                       ("nft", 0, [0.3, 0.5], {}), ("nft", 1, [0.3, 0.35], {}), ("awm", 0, [0.3, 0.4], {})])
    # nft - top_bottom: seed 0 +0.1, seed 1 0.0 -> +0.05 +- 0.05; awm has one common seed: no paired SE, not shown
    assert summary["nft"]["minus_preset"] == (pytest.approx(0.05), pytest.approx(0.05))
    assert all(math.isnan(x) for x in summary["awm"]["minus_preset"])
    assert "| +0.050 ± 0.050 |" in co.table(summary)


# ---- per-image evals, the clustered SE and the ratios against GRPO

def image_row(variant, seed, exact_by_eval, knob=("knob", 1.0), extra=(), samples=2, eval_every=10, images_per_step=64):
    """An archive row with per-image evals, as `result` writes one (prompt-major, `samples` images per prompt)."""
    curve = [{"step": k * eval_every, "images": k * eval_every * images_per_step, "exact_match": sum(e) / len(e),
              "reward": sum(e) / len(e), "exact_match_gain_se": 0.0, "exact_by_image": list(e)}
             for k, e in enumerate(exact_by_eval)]
    steps = eval_every * (len(curve) - 1)
    gain = curve[-1]["exact_match"] - curve[0]["exact_match"]
    return {"variant": variant, "seed": seed, "knob": list(knob), "curve": curve, "defaults": co.DEFAULTS, "collapse_step": None,
            "exact_match_gain": gain, "reward_gain": gain, "final_exact_match": curve[-1]["exact_match"],
            "exact_match_gain_paired_se": 0.01, "reward_gain_paired_se": 0.01,
            "image_prompt": [k // samples for k in range(len(exact_by_eval[0]))], "images": steps * images_per_step,
            "rollout_tflop": 1.0, "update_tflop": 1.0, "rollout_seconds": 1.0, "train_seconds": 1.0,
            "steps": steps, "extra": list(extra)}


def test_result_keeps_every_eval_image_with_its_prompt_and_the_gain_se_is_clustered_by_prompt(tmp_path):
    folder = str(tmp_path / "run")
    write_run(folder, [0.5, 0.5])
    rows = [json.loads(line) for line in open(os.path.join(folder, "metrics.jsonl"))]
    rewards = {0: [1.0, 1.0, 0.2, 0.5, 1.0, 0.0], 10: [1.0, 1.0, 1.0, 1.0 - 1e-12, 0.9, 0.0]}  # 3 prompts x 2 seeds
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(dict(row, **({"eval/rewards": rewards[row["step"]]} if "eval/exact_match" in row else {}))) + "\n")
    config = json.load(open(os.path.join(folder, "config.json")))
    json.dump(dict(config, eval_samples_per_prompt=2), open(os.path.join(folder, "config.json"), "w"))
    r = co.result("nft", 0, ("nft_beta", 0.1), folder)
    assert r["image_prompt"] == [0, 0, 1, 1, 2, 2]
    assert [p["exact_by_image"] for p in r["curve"]] == [[1, 1, 0, 0, 1, 0], [1, 1, 1, 1, 0, 0]]
    assert r["curve"][1]["reward_by_image"][4] == 0.9
    # per-image differences 0, 0, +1, +1, -1, 0 -> prompt means 0, 1, -0.5: their stdev / sqrt 3
    prompt_means = [0.0, 1.0, -0.5]
    mean = sum(prompt_means) / 3
    expected = math.sqrt(sum((m - mean) ** 2 for m in prompt_means) / 2) / math.sqrt(3)
    assert cs.gain_se(r) == (pytest.approx(expected), "clustered by prompt")
    image_level = math.sqrt(sum((d - 1 / 6) ** 2 for d in [0, 0, 1, 1, -1, 0]) / 5) / math.sqrt(6)
    assert expected != pytest.approx(image_level)  # the clustering changes it
    summary = co.summarise([r])
    assert summary["nft"]["exact_match_gain_se"] == pytest.approx(expected) and "(clustered by prompt)" in co.table(summary)
    # a row archived before the per-image data: its paired image-level SE, named as such
    old = {k: v for k, v in r.items() if k != "image_prompt"}
    assert cs.gain_se(old) == (0.01, "image-level SE (old row)")
    assert "(image-level SE (old row))" in co.table(co.summarise([old]))


def test_cluster_se_is_the_se_over_cluster_means():
    values = [0.1, 0.3, 0.0, 0.2, 0.5, 0.7, 0.4, 0.6]
    means = [0.2, 0.1, 0.6, 0.5]  # clusters of two, in any order
    m = sum(means) / 4
    assert cs.cluster_se(values, [0, 0, 1, 1, 2, 2, 3, 3]) == pytest.approx(
        math.sqrt(sum((x - m) ** 2 for x in means) / 3) / 2)


def exact_list(ones_per_prompt, samples=2):
    """Per-image exact matches, prompt-major: prompt p has its first ones_per_prompt[p] of `samples` images right."""
    return [int(j < n) for n in ones_per_prompt for j in range(samples)]


def test_x_fewer_images_to_the_target_and_the_area_ratio_against_grpo_with_per_seed_values():
    start = exact_list([1, 1, 0, 0])  # 0.25 on 4 prompts x 2 seeds
    grpo = [image_row("grpo", s, [start, exact_list([1, 1, 1, 0]), exact_list([1, 1, 1, 1]), exact_list([2, 1, 1, 1])])
            for s in (0, 1)]  # 0.25, 0.375, 0.5, 0.625 at 0, 640, 1280, 1920 images
    awm = [image_row("awm", 0, [start, exact_list([2, 2, 1, 1]), exact_list([2, 2, 1, 1]), exact_list([2, 2, 1, 1])]),
           image_row("awm", 1, [start, exact_list([2, 1, 1, 0]), exact_list([2, 2, 1, 1]), exact_list([2, 2, 1, 1])])]
    dpo = [image_row("dpo", s, [start] * 4) for s in (0, 1)]
    g = cs.against_grpo(awm, grpo, resamples=300)
    # target = 0.25 + 0.5 x (0.625 - 0.25) = 0.4375; GRPO crosses it half-way from 640 to 1280 images: 960;
    # awm's mean curve 0.25, 0.625, 0.75, 0.75 crosses it at 640 x 0.1875 / 0.375 = 320 images: 3x fewer
    assert g["target"] == pytest.approx(0.4375)
    assert g["fewer_images"] == pytest.approx(3.0)
    # per seed: seed 0 (0.75 at 640) at 640 x 0.1875 / 0.5; seed 1 (0.5 at 640) at 640 x 0.1875 / 0.25
    assert g["images_to_target_by_seed"] == [pytest.approx(240), pytest.approx(480)]
    # areas of the gain curves (trapezoids of 640 images): awm seed 0 gains 0, 0.5, 0.5, 0.5; seed 1 0, 0.25,
    # 0.5, 0.5; GRPO 0, 0.125, 0.25, 0.375: 640 x 0.5625 = 360
    assert g["area_by_seed"] == [pytest.approx(640 * (0.25 + 0.5 + 0.5)), pytest.approx(640 * (0.125 + 0.375 + 0.5))]
    assert g["area_ratio"] == pytest.approx((800 + 640) / 2 / 360) and g["grpo_area_by_seed"] == [pytest.approx(360)] * 2
    assert g["prompts_resampled"] and g["seeds"] == [0, 1]
    assert g["fewer_images_ci"][0] <= g["fewer_images"] <= g["fewer_images_ci"][1]
    assert g["area_ratio_ci"][0] < g["area_ratio"] < g["area_ratio_ci"][1]
    assert cs.against_grpo(awm, grpo, resamples=300) == g  # a fixed bootstrap seed: deterministic
    never = cs.against_grpo(dpo, grpo, resamples=50)
    assert never["fewer_images"] == 0.0 and never["images_to_target_by_seed"] == [None, None]
    summary = co.summarise(grpo + awm + dpo)
    assert summary["grpo"]["against_grpo"]["fewer_images"] == pytest.approx(1.0)
    assert "| 240 / 480 | 3.00 [" in co.table(summary) and "; by seed 2.22 / 1.78 |" in co.table(summary) and "| - / - | not reached [" in co.table(summary)


def test_the_bootstrap_matches_an_independent_resampling_of_seeds_then_prompts():
    """The area ratio's interval against a loop written here from the rule: seeds with replacement, then
    within each drawn seed the prompts with replacement (one draw for both objectives), 2.5 / 97.5 %."""
    import numpy as np

    rng = np.random.default_rng(7)
    runs = {name: [image_row(name, s, [exact_list(rng.integers(0, 3, 6)) for _ in range(3)]) for s in (0, 1, 2)]
            for name in ("nft", "grpo")}
    got = cs.against_grpo(runs["nft"], runs["grpo"], resamples=400, seed=11)
    draw = np.random.default_rng(11)
    per_prompt = {name: [np.array([[sum(p["exact_by_image"][2 * k:2 * k + 2]) / 2 for k in range(6)] for p in r["curve"]])
                         for r in runs[name]] for name in runs}
    ratios = []
    for _ in range(400):
        curves = {"nft": [], "grpo": []}
        for s in draw.integers(0, 3, 3):
            pick = draw.integers(0, 6, 6)
            for name in curves:
                curves[name].append(per_prompt[name][s][:, pick].mean(axis=1))
        areas = {name: np.trapezoid(np.mean(c, axis=0) - np.mean(c, axis=0)[0], [0, 640, 1280]) for name, c in curves.items()}
        if areas["grpo"] > 0:
            ratios.append(areas["nft"] / areas["grpo"])
    assert got["area_ratio_ci"] == (pytest.approx(np.percentile(ratios, 2.5, method="lower")),
                                    pytest.approx(np.percentile(ratios, 97.5, method="higher")))


# ---- the tuning protocol

def favouring(variant, lr_factor, updates_one, knob_factor):
    """A score for protocol_plan that prefers lr = centre x lr_factor, then 1 update (or the current), then
    knob = official x knob_factor (all runs scored)."""
    centre, _, _, official = co.PROTOCOL[variant]
    return lambda c: (-abs(math.log(c[0] / (centre * lr_factor))) - (c[1] != 1 if updates_one else c[1] == 1)
                      - abs(math.log(c[2] / (official * knob_factor))))


def test_every_objective_gets_the_same_protocol():
    assert set(co.CORE) <= set(co.PROTOCOL) <= set(co.VARIANTS)
    assert not set(co.TUNING_SEEDS) & set(co.REPORT_SEEDS) and len(co.TUNING_SEEDS) == 2
    assert max(co.LR_GRID) / min(co.LR_GRID) == pytest.approx(10) and 1.0 in co.LR_GRID and 1.0 in co.KNOB_GRID
    for variant, (centre, updates, knob, official) in co.PROTOCOL.items():
        stages, winner = co.protocol_plan(variant, favouring(variant, 3.0, True, 0.1))
        configs = co.protocol_configs(stages)
        assert len(stages) == 3 and len(configs) == 6  # the same budget for every objective
        assert stages[0] == [(co.canonical(centre * g), updates, official) for g in co.LR_GRID]  # lr at the official knob
        assert stages[1] == [(co.canonical(3 * centre), updates, official), (co.canonical(3 * centre), 1, official)]
        assert official in [c[2] for c in stages[2]]  # the official value among the knob's candidates
        assert winner == (co.canonical(3 * centre), 1, co.canonical(official / 10))
        assert co.official_config(variant) == (centre, co.OFFICIAL_UPDATES[variant], official)
        job = co.config_job(variant, 100, winner)
        assert job[2] == (knob, co.canonical(official / 10)) and job[3][:2] == ("--learning_rate", f"{3 * centre:g}")
    # the official scripts' steps per rollout batch: NFT's OCR recipe and Flow-GRPO two, the others one
    assert {v: co.official_config(v)[1] for v in co.PROTOCOL} == {"top_bottom_trdpo": 1, "dgpo": 1, "nft": 2, "awm": 1, "grpo": 2}
    # a stage is not reached before the one before it has every score; a tie keeps each stage's centre
    stages, winner = co.protocol_plan("nft", lambda c: None if c[0] == 1.5e-3 else 0.0)
    assert len(stages) == 1 and winner is None
    assert co.protocol_plan("nft", lambda c: 0.0)[1] == (5e-4, 4, 0.1)
    # the flags that set a config are only those off the run's defaults: the preset's config keeps its old key
    assert co.config_flags("top_bottom", 5e-4, 4) == () and co.config_flags("grpo", 1e-3, 2) == ("--learning_rate", "0.001")
    assert co.command("grpo", 0, ("grpo_kl_weight", 0.04), "out", 40, 10, "", ["--updates_per_rollout", "1"])[-2:] == [
        "--updates_per_rollout", "1"]  # after the variant's own 2: the last one counts
    # the moving reference moves every 10 rollout steps at any updates per rollout; a derived flag replaces its base's
    assert co.config_flags("top_bottom_trdpo", 5e-4, 1) == ("--updates_per_rollout", "1", "--ref_update_every", "10")
    assert co.VARIANTS["top_bottom"][-2:] == ["--ref_update_every", "0"]
    assert co.VARIANTS["top_bottom_trdpo"].count("--ref_update_every") == 1 and "40" in co.VARIANTS["top_bottom_trdpo"]


def test_the_text_world_defaults_the_flags_are_relative_to():
    import train_online_dpo

    preset = train_online_dpo.PRESETS["text_world"]
    assert (preset["learning_rate"], preset["updates_per_rollout"]) == (co.TEXT_WORLD_LR, co.TEXT_WORLD_UPDATES)


def test_tuning_score_is_the_mean_of_the_last_two_evals():
    assert cs.tuning_score({"curve": [{"exact_match": x} for x in (0.3, 0.5, 0.4, 0.6)]}) == pytest.approx(0.5)


def protocol_archive(path, variants=("nft", "grpo")):
    """Every tuning run (scores from `favouring`: lr x3, 1 update, knob x0.1 win), then both arms on the report seeds."""
    rows = []
    for variant in variants:
        score = favouring(variant, 3.0, True, 0.1)
        stages, winner = co.protocol_plan(variant, score)
        for seed in co.TUNING_SEEDS:
            for config in co.protocol_configs(stages):
                level = exact_list([1] * max(0, min(8, round(8 + score(config)))) + [0] * 8)[:16]  # 16 images
                rows.append(image_row(variant, seed, [exact_list([1] * 8)] * 3 + [level] * 2, *job_parts(variant, seed, config)))
        for arm, config, gain in (("official", co.official_config(variant), 2), ("tuned", winner, 3)):
            for seed in co.REPORT_SEEDS:
                rows.append(image_row(variant, seed, [exact_list([1] * 8)] * 2 + [exact_list([2] * gain + [1] * (8 - gain))] * 3,
                                      *job_parts(variant, seed, config)))
    with open(path, "w") as f:
        f.writelines(json.dumps(dict(r, steps=40)) + "\n" for r in rows)


def job_parts(variant, seed, config):
    _, _, knob, flags = co.config_job(variant, seed, config)
    return knob, flags


def run_main(monkeypatch, capsys, *argv):
    monkeypatch.setattr(sys, "argv", ["compare_objectives.py", *argv])
    co.main()
    return capsys.readouterr().out


def test_summary_prints_both_arms_and_the_protocol_table_from_the_archive(tmp_path, monkeypatch, capsys):
    archive = str(tmp_path / "archive.jsonl")
    protocol_archive(archive)
    out = run_main(monkeypatch, capsys, "--workdir", str(tmp_path / "w"), "--variants", "nft", "grpo", "--summary_only",
                   "--archive", archive, "--json", str(tmp_path / "s.json"), "--plot_arms", str(tmp_path / "arm"))
    assert all(os.path.getsize(tmp_path / f"arm-{arm}.png") > 1000 for arm in ("official", "tuned"))
    arms = json.load(open(tmp_path / "s.json"))["arms"]
    assert arms["tuned"]["nft"]["seeds"] == list(co.REPORT_SEEDS) and arms["official"]["grpo"]["against_grpo"]["area_ratio"] == 1
    official, tuned = out.split("official arm")[1].split("tuned arm")
    assert "| nft (nft_beta 0.1, updates_per_rollout 2) | +0.125 / +0.125 / +0.125 / +0.125 / +0.125 |" in official
    assert "| grpo (grpo_clip_range 1e-05, learning_rate 0.001) |" in official  # the variant's own 2 steps
    assert "| nft (nft_beta 0.01, learning_rate 0.0015, updates_per_rollout 1) | +0.188 / " in tuned
    assert "| grpo (grpo_clip_range 1e-06, learning_rate 0.003, updates_per_rollout 1) |" in tuned
    table = run_main(monkeypatch, capsys, "--workdir", str(tmp_path / "w"), "--variants", "nft", "grpo", "--protocol",
                     "--archive", archive, "--plot_sensitivity", str(tmp_path / "lr.png"))
    assert table.count("**yes**") == 2 and table.count("| nft |") == 6 and table.count("| grpo |") == 6
    assert "| nft | 3 | 0.0015 | 1 | nft_beta 0.01 | 0.500 (0.500, 0.500) | **yes** |" in table
    assert os.path.getsize(tmp_path / "lr.png") > 1000
    assert not os.path.exists(tmp_path / "w")  # nothing ran


def test_a_dry_run_lists_the_protocols_first_round(tmp_path, monkeypatch, capsys):
    out = run_main(monkeypatch, capsys, "--workdir", str(tmp_path / "w"), "--variants", "nft", "awm", "--run_protocol",
                   "--dry_run", "--archive", str(tmp_path / "none.jsonl"))
    assert "22 run(s) to start (0 of 22 already finished)" in out  # per objective 3 lrs x 2 tuning seeds + 5 official
    assert "nft-s100-nft_beta0.1-learning_rate0.00015: " in out and "--learning_rate 0.00015" in out
    assert "awm-s4-awm_old_kl_weight1-updates_per_rollout1: " in out
    assert not os.path.exists(tmp_path / "w") and not os.path.exists(tmp_path / "none.jsonl")


@pytest.mark.parametrize("argv, message", [
    (["--knob", "foo=1"], "--knob 'foo=1': unknown variant 'foo' (valid: best_worst, top_bottom,"),
    (["--knob", "awm=abc"], "--knob 'awm=abc': 'abc' is not a finite number (the value of awm_old_kl_weight)"),
    (["--knob", "awm"], "--knob 'awm': expected VARIANT=VALUE"),
    (["--sweep", "foo"], "--sweep 'foo': unknown variant (valid: best_worst, top_bottom,"),
    (["--protocol"], "--run_protocol, --protocol and --plot_sensitivity read the tuning runs from --archive"),
])
def test_bad_inputs_are_one_line_and_exit_2_before_any_run(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.setattr(sys, "argv", ["compare_objectives.py", "--workdir", str(tmp_path / "w"), *argv])
    with pytest.raises(SystemExit) as error:
        co.main()
    err = capsys.readouterr().err
    assert error.value.code == 2 and message in err and err.count("\n") == 1
    assert not os.path.exists(tmp_path / "w")


def test_the_protocol_starts_a_stage_as_soon_as_the_one_before_is_scored(tmp_path, monkeypatch):
    """--run_protocol with real processes in place of the trainer: each free slot takes the first run the
    protocol has reached (tuning first), so stage 2 starts before the official arm has all started, and
    every run of the protocol runs once and is archived."""
    archive, fake = str(tmp_path / "archive.jsonl"), tmp_path / "fake_run.py"
    fake.write_text(FAKE_RUN)
    # an earlier attempt of the first run, stopped after its step-0 eval: started again, so no baseline
    stopped = tmp_path / "w" / co.run_name("nft", 100, ("nft_beta", 0.1), ("--learning_rate", "0.00015"))
    os.makedirs(stopped)
    (stopped / "metrics.jsonl").write_text(json.dumps({"step": 0, "eval/reward_mean": 0.1, "eval/rewards": [0.1]}) + "\n")
    started, baselines = [], []

    def command(variant, seed, knob, out, steps, eval_every, baseline, extra):
        started.append((seed, tuple(extra), knob[1]))
        baselines.append(baseline)
        return [sys.executable, str(fake), out, archive, "0.4"]

    sleep = time.sleep
    monkeypatch.setattr(co.time, "sleep", lambda _: sleep(0.05))
    monkeypatch.setattr(co, "command", command)
    monkeypatch.setattr(sys, "argv", ["compare_objectives.py", "--variants", "nft", "--steps", "20", "--jobs", "2",
                                      "--workdir", str(tmp_path / "w"), "--archive", archive, "--run_protocol"])
    co.main()
    assert len(started) == len(set(started)) == 22  # 12 tuning (6 configurations x 2 seeds), 5 official, 5 tuned
    assert len(co.load_archive(archive)) == 22
    one_pass = ("--updates_per_rollout", "1")
    first_stage2 = started.index((100, one_pass, 0.1))  # the one new configuration of stage 2 (all scores tie)
    last_official = max(i for i, (seed, flags, _) in enumerate(started)
                        if seed in co.REPORT_SEEDS and flags == ("--updates_per_rollout", "2"))  # NFT's official 2 steps
    assert first_stage2 < last_official
    assert all(seed in co.TUNING_SEEDS for seed, _, _ in started[:6])  # stage 1 first
    assert baselines[0] == "" and set(baselines[1:]) == {str(tmp_path / "w" / co.run_name("nft", 100, ("nft_beta", 0.1)))}
