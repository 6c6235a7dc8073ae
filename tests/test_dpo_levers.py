"""Online DPO's collapse watch (dpo_watch.py) and its stabilising levers (docs/objectives.md,
"Keeping online DPO stable"): the warning rule on synthetic rows and on real tiny runs, and each
lever's effect on a real tiny policy (tests/objective_worker.py's hand-made rollouts)."""

import dataclasses
import os
import re

import pytest
import torch

import dpo_watch
import objective_worker
import train_online_dpo
from run_config import ConfigError, parse_config


# ---- the warning rule on synthetic metric rows

def evals(*scores, se=0.0):
    return [{"step": 2 * i, "eval/reward_mean": s, "eval/reward_se": se} for i, s in enumerate(scores)]


def test_eval_fall_names_the_best_checkpoint_or_says_none_was_kept(tmp_path):
    rows = evals(0.50, 0.56, 0.58, 0.52)  # gained 0.08, lost 0.06 of it
    os.makedirs(tmp_path / "checkpoint-4")
    line = dpo_watch.collapse_warning(rows, str(tmp_path))
    assert "fell to 0.52 at step 6 from its best 0.58 (step 4" in line
    assert os.path.join(str(tmp_path), "checkpoint-4") in line
    os.rmdir(tmp_path / "checkpoint-4")
    assert "no checkpoint was kept for the best eval so far (step 4)" in dpo_watch.collapse_warning(rows, str(tmp_path))
    # exact match is the score when logged
    exact = [{**row, "eval/exact_match": e} for row, e in zip(rows, (0.4, 0.43, 0.41, 0.18))]
    assert "eval/exact_match fell to 0.18 at step 6 from its best 0.43 (step 2" in dpo_watch.collapse_warning(exact, "x")


@pytest.mark.parametrize("scores,se", [
    ((0.50, 0.52, 0.55, 0.58), 0.0),  # rising
    ((0.50, 0.56, 0.58, 0.55), 0.0),  # lost less than half the gain
    ((0.50, 0.48, 0.45, 0.40), 0.0),  # never gained: not a collapse (nothing to go back to)
    ((0.50, 0.56, 0.58, 0.52), 0.04),  # the fall is within 2 standard errors
    ((0.50, 0.58), 0.0),  # too few evals
])
def test_no_warning_without_the_pattern(scores, se):
    assert dpo_watch.collapse_warning(evals(*scores, se=se), "x") is None


def test_chosen_error_rise_needs_three_steps_in_a_row():
    def step(s, above, ref=1.0):
        return {"step": s, "dpo/chosen_err_above_ref": above, "dpo/ref_err_chosen": ref, "dpo/loss": 0.5}

    rows = evals(0.5) + [step(1, 0.2), step(2, 0.3), step(3, 0.05), step(4, 0.2), step(5, 0.15)]
    assert dpo_watch.collapse_warning(rows, "x") is None  # step 3 broke the run (0.05 <= 10 % of 1.0)
    rows.append(step(6, 0.5))
    line = dpo_watch.collapse_warning(rows, "x")
    assert "chosen samples was above the reference's by more than 10% of it for 3 steps in a row (to step 6)" in line
    assert "no checkpoint was kept for the best eval so far (step 0)" in line
    assert dpo_watch.collapse_warning(rows + [{"step": 7, "update/skipped_no_pairs": 1.0}], "x") is None


def test_a_grad_norm_blow_up_warns_after_two_steps_in_a_row_above_3x_the_early_median(tmp_path):
    """The text world's collapsed seed 4 (the preset) logged these grad norms (steps 1-10, then 26-30):
    the rule fires at step 29, the eval showed the fall at step 30; the 8 runs that did not collapse
    never had a step above 3x their early median."""
    early = [1.13, 1.05, 1.04, 1.1, 1.32, 1.2, 1.27, 1.3, 1.19, 1.19]  # median 1.19
    rows = evals(0.339) + [{"step": i + 1, "dpo/loss": 0.65, "update/grad_norm": g} for i, g in enumerate(early)]
    rows += [{"step": 20, "eval/exact_match": 0.427, "eval/exact_match_se": 0.036}]
    (tmp_path / "checkpoint-20").mkdir()
    late = [(26, 2.18), (27, 3.1), (28, 3.9), (29, 9.5)]
    for k, (s, g) in enumerate(late):
        rows.append({"step": s, "dpo/loss": 1.0, "update/grad_norm": g})
        line = dpo_watch.collapse_warning(rows, str(tmp_path))
        assert (line is None) == (s < 29), (s, line)  # 3 x 1.19 = 3.57: steps 28 and 29 are the first two above
    assert "grad norm was above 3x its early median (1.19) for 2 steps in a row (to step 29: 9.5)" in line
    assert f"the best eval so far (step 20) is in {tmp_path / 'checkpoint-20'}" in line


def test_the_watch_warns_once():
    watch = dpo_watch.CollapseWatch("x")
    lines = []
    for i, score in enumerate((0.5, 0.6, 0.52, 0.51, 0.5)):
        watch.add({"eval/reward_mean": score}, 2 * i)
        lines.append(watch.check())
    assert [line is not None for line in lines] == [False, False, True, False, False]


# ---- the warning on real tiny runs

COLLAPSE_RUN = ["--preset", "cpu_tiny", "--max_steps", "8", "--eval_every", "2", "--checkpoint_every", "2",
                "--sample_grid_every", "0", "--max_eval_prompts", "4"]


@pytest.mark.slow
@pytest.mark.parametrize("learning_rate,best", [("1.0", 6), ("3e-2", None)])
def test_a_collapsing_tiny_run_warns_once_and_a_normal_one_does_not(tmp_path, capsys, learning_rate, best):
    """cpu_tiny at lr 1.0 (33x the preset's): the eval reward climbs from 0.505 to 0.574 at step 6,
    then falls to 0.516 at step 8 (the velocity norm ~100-600x the reference's); at the preset's lr
    it rises steadily."""
    out = str(tmp_path / "run")
    train_online_dpo.main(COLLAPSE_RUN + ["--learning_rate", learning_rate, "--output_dir", out])
    lines = [line for line in capsys.readouterr().out.splitlines() if "may be collapsing" in line]
    if best is None:
        assert lines == []
    else:
        assert len(lines) == 1 and f"fell to 0.5163 at step 8 from its best 0.5741 (step {best}" in lines[0]
        assert f"is in {os.path.join(out, f'checkpoint-{best}')} " in lines[0]


# ---- the levers, on a real tiny policy

def dpo_setup(tiny_dir, *flags):
    return objective_worker.setup("dpo", tiny_dir, extra=flags)


def lora_weights(policy) -> dict:
    return {n: p.detach().clone() for n, p in policy.transformer.named_parameters() if ".default." in n}


def pair_uses(tiny_dir, split: str, *flags, sigmas_seen: list | None = None) -> tuple[list[int], int]:
    """-> (how many times each pair's chosen sample went through the policy in one rollout batch's
    update, optimizer steps taken); the forwards are recorded (their sigmas into sigmas_seen), the real
    ones run."""
    from pairing import select_pairs

    objective, policy, cache = dpo_setup(tiny_dir, "--pair_strategy", "top_bottom", "--update_split", split, *flags)
    rollouts = objective_worker.rollouts_for(0, 0, 1)
    chosen = select_pairs(rollouts.group_ids, rollouts.rewards, "top_bottom")[:, 0].tolist()
    seen, velocity = [], policy.velocity

    def recording(*args):
        seen.append(args[0][0::2].clone())  # the chosen rows of the micro-batch
        if sigmas_seen is not None:
            sigmas_seen.append(args[2].clone())
        return velocity(*args)
    policy.velocity = recording
    objective.update(policy, rollouts, cache, 0)
    uses = [sum(int((batch == rollouts.latents[c]).all(dim=(1, 2)).sum()) for batch in seen) for c in chosen]
    return uses, policy.optimizer_steps


def test_update_split_disjoint_uses_each_pair_once(tiny_dir):
    uses, steps = pair_uses(tiny_dir, "disjoint")
    assert len(uses) == 6 and uses == [1] * 6 and steps == 2  # 2 optimizer steps of 3 pairs
    uses, steps = pair_uses(tiny_dir, "")  # dpo's "" is "all": every pair in each of the 2 steps
    assert uses == [2] * 6 and steps == 2


def test_train_timesteps_trains_each_pair_at_several_draws_in_one_optimizer_step(tiny_dir):
    one, two = [], []
    assert pair_uses(tiny_dir, "disjoint", sigmas_seen=one) == ([1] * 6, 2)
    uses, steps = pair_uses(tiny_dir, "disjoint", "--train_timesteps", "2", sigmas_seen=two)
    assert uses == [2] * 6 and steps == 2  # every pair at 2 draws, the same 2 optimizer steps
    assert len(one) == 2 and len(two) == 4  # per update: one micro-batch per draw
    # each update's first draw is the one train_timesteps 1 (Diffusion-DPO's one per pair) takes
    assert torch.equal(two[0], one[0]) and torch.equal(two[2], one[1])
    assert not torch.equal(two[1], two[0]) and not torch.equal(two[3], two[2])
    _, single = one_update(tiny_dir)
    _, double = one_update(tiny_dir, None, "--train_timesteps", "2")
    assert not same(single, double, atol=1e-7)


def one_update(tiny_dir, rewards=None, *flags):
    objective, policy, cache = dpo_setup(tiny_dir, "--updates_per_rollout", "1", *flags)
    rollouts = objective_worker.rollouts_for(0, 0, 1)
    if rewards is not None:
        rollouts = dataclasses.replace(rollouts, rewards=rewards)
    metrics, _ = objective.update(policy, rollouts, cache, 0)
    return metrics, lora_weights(policy)


def same(a: dict, b: dict, atol=0.0) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=0, atol=atol) for k in a)


def test_margin_weighting_changes_the_update_only_when_margins_differ(tiny_dir):
    _, plain = one_update(tiny_dir)
    _, weighted = one_update(tiny_dir, None, "--pair_weighting", "margin")
    assert not same(plain, weighted, atol=1e-7)  # random rewards: unequal margins
    equal_gaps = torch.tensor([v + 0.01 * g for g in range(4) for v in (0.0, 0.25, 0.5, 1.0)], dtype=torch.float64)
    _, plain = one_update(tiny_dir, equal_gaps)
    _, weighted = one_update(tiny_dir, equal_gaps, "--pair_weighting", "margin")
    assert same(plain, weighted, atol=1e-7)  # every weight 1


def test_chosen_sft_term_and_norm_guard_and_winner_preserving_reach_the_update(tiny_dir):
    plain_metrics, plain = one_update(tiny_dir)
    assert not any(k in plain_metrics for k in ("dpo/chosen_sft_loss", "dpo/norm_guard_penalty", "dpo/winner_scale"))
    metrics, rpo = one_update(tiny_dir, None, "--chosen_sft_weight", "1")
    assert metrics["dpo/chosen_sft_loss"] == pytest.approx(metrics["dpo/err_chosen"], rel=1e-6)
    assert not same(plain, rpo, atol=1e-7)
    # with mu 0 the bound is > 1 on these random latents (the shared noise aligns chosen and rejected
    # errors only partly): a safety margin mu = 0.9 makes it bite
    metrics, _ = one_update(tiny_dir, None, "--winner_preserving")
    assert metrics["dpo/winner_scale"] == 1.0
    metrics, sdpo = one_update(tiny_dir, None, "--winner_preserving", "--winner_preserving_mu", "0.9")
    assert 0 < metrics["dpo/winner_scale"] < 1 and not same(plain, sdpo, atol=1e-7)
    # the guard has nothing to do at the start (ratio 1); after a big step it pulls back
    flags = ("--learning_rate", "1.0", "--updates_per_rollout", "2", "--norm_guard_tolerance", "0")
    big_metrics, big = pair_update(tiny_dir, *flags)
    guard_metrics, guarded = pair_update(tiny_dir, *flags, "--norm_guard_weight", "10")
    assert big_metrics["dpo/velocity_norm_ratio"] > 1.05 and guard_metrics["dpo/norm_guard_penalty"] > 0
    assert not same(big, guarded, atol=1e-7)


def pair_update(tiny_dir, *flags):
    objective, policy, cache = objective_worker.setup("dpo", tiny_dir, extra=flags)
    metrics, _ = objective.update(policy, objective_worker.rollouts_for(0, 0, 1), cache, 0)
    return metrics, lora_weights(policy)


def predictions(policy, cache):
    """(reference, base model with adapters off, trained policy) on 2 fixed rows, no gradient."""
    import qwen_image as qi

    rollouts = objective_worker.rollouts_for(0, 0, 1)
    x0 = rollouts.latents[:2]
    noise, sigmas = torch.randn(x0.shape, generator=torch.Generator().manual_seed(9)), torch.tensor([0.6, 0.6])
    args = (x0, noise, sigmas, *policy.conditioning(cache, rollouts.prompts[:2], "cpu"))
    with torch.no_grad(), qi.lora_disabled(policy.transformer):
        base = policy._velocity(policy.transformer, *args)
    with torch.no_grad():
        trained = policy.velocity(*args)
    return policy.reference_velocity(*args), base, trained


def test_moving_reference_soft_update_and_checkpoint(tiny_dir, tmp_path):
    from policy import REF_ADAPTER

    objective, policy, cache = dpo_setup(tiny_dir, "--updates_per_rollout", "1", "--ref_update_every", "1",
                                         "--ref_update_alpha", "0.5")
    ref, base, _ = predictions(policy, cache)
    assert torch.equal(ref, base)  # the reference adapter starts at the trained one's zero delta
    expected = {id(r): t.detach().clone() for t, r in policy.ref_pairs}
    assert len(expected) > 0
    for step in range(2):
        objective.update(policy, objective_worker.rollouts_for(step, 0, 1), cache, step)
        for trained, r in policy.ref_pairs:  # ref <- 0.5 trained + 0.5 ref after each optimizer step
            expected[id(r)] = 0.5 * trained.detach() + 0.5 * expected[id(r)]
    assert all(torch.allclose(r, expected[id(r)], atol=1e-7) for _, r in policy.ref_pairs)
    ref, base, trained = predictions(policy, cache)
    assert not torch.allclose(ref, base) and not torch.allclose(ref, trained)
    saved = {t: t.detach().clone() for t, _ in policy.ref_pairs}
    with torch.no_grad():  # the trained adapter set to the expected reference weights predicts the same
        for t, r in policy.ref_pairs:
            t.copy_(expected[id(r)])
    assert torch.allclose(predictions(policy, cache)[2], ref, atol=1e-6)
    with torch.no_grad():
        for t, _ in policy.ref_pairs:
            t.copy_(saved[t])
    # the checkpoint carries the reference adapter
    policy.save_checkpoint(str(tmp_path), 2, None)
    _, resumed, _ = dpo_setup(tiny_dir, "--updates_per_rollout", "1", "--ref_update_every", "1", "--ref_update_alpha", "0.5")
    resumed.load_checkpoint(str(tmp_path / "checkpoint-2"))
    restored = dict(resumed.transformer.named_parameters())
    assert any(f".{REF_ADAPTER}." in n for n in restored)
    for name, p in policy.transformer.named_parameters():
        if f".{REF_ADAPTER}." in name:
            assert torch.equal(restored[name], p)


def test_frozen_reference_stays_the_base_model(tiny_dir):
    objective, policy, cache = dpo_setup(tiny_dir, "--updates_per_rollout", "1")
    assert policy.ref_pairs == []
    objective.update(policy, objective_worker.rollouts_for(0, 0, 1), cache, 0)
    ref, base, trained = predictions(policy, cache)
    assert torch.equal(ref, base) and not torch.allclose(trained, base)


def test_diagnostics_are_logged(tiny_dir):
    metrics, _ = one_update(tiny_dir)
    for key in ("dpo/err_chosen", "dpo/err_rejected", "dpo/ref_err_chosen", "dpo/ref_err_rejected",
                "dpo/chosen_err_above_ref", "dpo/rejected_err_above_ref", "dpo/velocity_norm_ratio",
                "dpo/implicit_reward_margin", "pairs/reward_gap", "pairs/tied_fraction", "update/grad_norm"):
        assert key in metrics, key
    assert metrics["dpo/chosen_err_above_ref"] == pytest.approx(metrics["dpo/err_chosen"] - metrics["dpo/ref_err_chosen"])
    assert metrics["dpo/velocity_norm_ratio"] == pytest.approx(1.0, abs=1e-6)  # the first update: policy == reference
    # group 1 (all 0.5) ties: best_worst 1 tied candidate pair of 4, top_bottom 2 of 8; never trained
    assert metrics["pairs/tied_fraction"] == 0.25 and metrics["dpo/pair_updates"] == 3
    metrics, _ = one_update(tiny_dir, None, "--pair_strategy", "top_bottom")
    assert metrics["pairs/tied_fraction"] == 0.25 and metrics["dpo/pair_updates"] == 6


@pytest.mark.parametrize("flag,value,message", [
    ("pair_weighting", "reward", "must be 'none' or 'margin'"),
    ("chosen_sft_weight", "-1", "finite number >= 0"),
    ("norm_guard_weight", "nan", "finite number >= 0"),
    ("norm_guard_tolerance", "-0.1", "finite number >= 0"),
    ("winner_preserving_mu", "1.5", "in [0, 1]"),
    ("ref_update_every", "-1", ">= 0"),
    ("ref_update_alpha", "0", "in (0, 1]"),
])
def test_each_lever_field_is_validated(flag, value, message):
    config = parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, ["--preset", "cpu_tiny", f"--{flag}", value])
    with pytest.raises(ConfigError, match=f"`{flag}`: .*{re.escape(message)}"):
        train_online_dpo.validate(config)


def test_levers_refused_where_they_do_nothing():
    for flags, field in ((["--ref_update_every", "2", "--train_mode", "full"], "ref_update_every"),
                         (["--objective", "nft", "--norm_guard_weight", "1"], "norm_guard_weight"),
                         (["--objective", "dgpo", "--winner_preserving"], "winner_preserving")):
        config = parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, ["--preset", "cpu_tiny", *flags])
        with pytest.raises(ConfigError, match=f"`{field}`"):
            train_online_dpo.validate(config)


def test_the_text_world_presets_moving_reference_is_dpos_alone():
    """The preset moves DPO's reference (the adopted lever); a group objective on the preset gets a frozen
    one, as if the preset named DPO's levers only, and the lever given as a flag is still refused."""
    from dpo_update import preset_levers_off

    def config_of(*flags):
        argv = ["--preset", "text_world", *flags]
        config = parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, argv)
        preset_levers_off(config, argv)
        return config

    dpo = config_of()
    assert (dpo.ref_update_every, dpo.ref_update_alpha) == (40, 0.6)
    for objective in ("nft", "awm", "dgpo", "grpo"):
        group = config_of("--objective", objective)
        assert (group.ref_update_every, group.ref_update_alpha) == (0, 1.0)
        train_online_dpo.validate(group)  # no refusal: the preset's lever is off
    explicit = config_of("--objective", "nft", "--ref_update_every", "40")
    assert explicit.ref_update_every == 40
    with pytest.raises(ConfigError, match="`ref_update_every`: applies to objective dpo only"):
        train_online_dpo.validate(explicit)


def test_the_projects_second_adapter_raises_no_peft_warning(tiny_dir):
    """peft warns of "multiple adapters" on any second adapter; the moving reference's is meant, so a run
    does not print it (other warnings still show)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, policy, _ = dpo_setup(tiny_dir, "--updates_per_rollout", "1", "--ref_update_every", "1")
    assert policy.ref_pairs  # the second adapter exists
    assert not [w for w in caught if "Already found a `peft_config` attribute" in str(w.message)]
