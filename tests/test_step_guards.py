"""The online trainer's step guards: non-finite rollouts or rewards skip the update and count towards
max_nonfinite_in_a_row, steps that train nothing count towards max_degenerate_steps_in_a_row, both
counters survive a checkpoint, and weights whose last rollouts were non-finite are never exported."""

import json
import os
import subprocess
import sys

import pytest
import torch

import train_online_dpo
from conftest import ROOT


def make_policy(tiny_dir, *flags):
    import distributed
    import run_config
    import qwen_image as qi
    from policy import Policy

    config = run_config.parse_config(train_online_dpo.Config, train_online_dpo.PRESETS,
                             ["--preset", "cpu_tiny", "--pretrained", tiny_dir, *flags])
    pipe = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    return Policy(config, pipe, distributed.make_accelerator(config))


def test_guard_counters_stop_reset_and_survive_a_checkpoint(tiny_dir, tmp_path):
    from policy import TrainingStopped

    policy = make_policy(tiny_dir, "--max_nonfinite_in_a_row", "2", "--max_degenerate_steps_in_a_row", "3")
    finite, rewards = torch.zeros(4, 16, 64), torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)

    def step(trained: bool, latents=finite, step_rewards=rewards) -> dict:
        """One step as the trainer runs it; `trained`: the update takes an optimizer step (no gradients
        here, so AdamW leaves the weights alone, but the step is taken and counted)."""
        metrics, before = {}, policy.optimizer_steps
        if policy.check_rollouts(latents, step_rewards, 0, metrics) and trained:
            assert policy.optimizer_step(True, 0, metrics)
        policy.note_step(before, metrics)
        policy.stop_if_degenerate(0)
        return metrics

    # steps without an optimizer step (every group tied, no pairs) count in a row; a trained one resets
    assert step(False)["update/degenerate_in_a_row"] == 1
    assert step(True)["update/degenerate_in_a_row"] == 0
    assert [step(False)["update/degenerate_in_a_row"] for _ in range(2)] == [1, 2]
    assert policy.save_checkpoint(str(tmp_path), 5, None) is not None
    with open(tmp_path / "checkpoint-5" / "train_state.json") as f:
        assert json.load(f) == {"nonfinite_in_a_row": 0, "degenerate_in_a_row": 2, "step": 5}
    resumed = make_policy(tiny_dir, "--max_degenerate_steps_in_a_row", "3")
    assert resumed.load_checkpoint(str(tmp_path / "checkpoint-5")) == 5 and resumed.degenerate_in_a_row == 2
    with pytest.raises(TrainingStopped, match="3 steps in a row trained nothing"):
        step(False)

    # non-finite rollout latents: no update, counted in both counters, weights neither checkpointed nor exported
    policy.degenerate_in_a_row = 0
    nan_latents = finite.clone()
    nan_latents[2, 3, 5] = float("nan")
    metrics = step(True, latents=nan_latents)
    assert metrics["update/skipped_nonfinite_rollouts"] == 1 and "update/grad_norm" not in metrics
    assert (policy.nonfinite_in_a_row, policy.degenerate_in_a_row, policy.rollouts_nonfinite) == (1, 1, True)
    assert policy.save_checkpoint(str(tmp_path), 6, None) is None and not (tmp_path / "checkpoint-6").exists()
    with pytest.raises(TrainingStopped, match="not exported"):
        policy.save_final(str(tmp_path))
    assert not (tmp_path / "lora").exists()
    # non-finite rewards (finite latents): skipped and counted; the second in a row reaches the limit of 2
    with pytest.raises(TrainingStopped, match="2 non-finite updates or rollouts in a row"):
        step(True, step_rewards=torch.tensor([0.1, float("inf"), 0.3, 0.4], dtype=torch.float64))
    assert not policy.rollouts_nonfinite  # the latents were finite: these weights could be exported
    # a finite step that trains resets both counters
    step(True)
    assert (policy.nonfinite_in_a_row, policy.degenerate_in_a_row) == (0, 0)
    assert policy.save_final(str(tmp_path)) == str(tmp_path / "lora")

    never = make_policy(tiny_dir, "--max_degenerate_steps_in_a_row", "0")
    never.degenerate_in_a_row = 1000
    never.stop_if_degenerate(0)  # 0: never stops


def test_steps_without_pairs_stop_the_run_without_export(tmp_path):
    """DPO with a reward margin no pair reaches: every step is 'no pairs', nothing trains; the third in
    a row stops the run (max_degenerate_steps_in_a_row 3) before max_steps, and no lora/ is written."""
    from policy import TrainingStopped

    out = str(tmp_path / "run")
    with pytest.raises(TrainingStopped, match="step 2: 3 steps in a row trained nothing"):
        train_online_dpo.main(["--preset", "cpu_tiny", "--prompts_per_step", "2", "--samples_per_prompt", "2",
                               "--eval_every", "0", "--output_dir", out, "--max_steps", "5",
                               "--min_reward_margin", "1e9", "--max_degenerate_steps_in_a_row", "3"])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["update/degenerate_in_a_row"] for r in rows] == [1, 2, 3]
    assert all(r["update/skipped_no_pairs"] == 1 for r in rows)
    assert "lora" not in os.listdir(out)


@pytest.mark.slow
def test_guard_huge_learning_rate_fails_with_no_final_export(tmp_path):
    """The reproduction of issue 20 item 9: lr 1e30 leaves finite weights (1e30) that sample NaN latents
    (black images). It used to exit 0 and export that LoRA. Now the non-finite rollouts skip their
    update and count; the third non-finite in a row (one NaN update at step 0, NaN rollouts at steps
    1 and 2) stops with exit status 3, one line on stderr, and no lora/."""
    out = str(tmp_path / "x")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "train_online_dpo.py"), "--preset", "cpu_tiny",
                           "--max_steps", "3", "--learning_rate", "1e30", "--output_dir", out, "--log_with", "none"],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert done.returncode == 3, done.stderr[-3000:]
    stopped = [line for line in done.stderr.splitlines() if "stopped:" in line]
    assert len(stopped) == 1 and "no final weights written" in stopped[0] and "Traceback" not in done.stderr
    assert "lora" not in os.listdir(out)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if "reward/mean" in line]
    assert [r.get("update/skipped_nonfinite_rollouts", 0) for r in rows] == [0, 1, 1]
    assert [r["update/degenerate_in_a_row"] for r in rows] == [0, 1, 2]


@pytest.mark.slow
def test_guard_run_ending_on_nonfinite_rollouts_exports_nothing(tmp_path):
    """The same run with room for more non-finite steps than it has: it reaches the end with NaN
    rollouts from its last weights, and the final export refuses them."""
    from policy import TrainingStopped

    out = str(tmp_path / "x")
    with pytest.raises(TrainingStopped, match="not exported"):
        train_online_dpo.main(["--preset", "cpu_tiny", "--max_steps", "3", "--learning_rate", "1e30",
                               "--max_nonfinite_in_a_row", "5", "--eval_every", "0", "--output_dir", out])
    assert "lora" not in os.listdir(out)


def test_guard_limit_is_validated_before_any_model_loads():
    with pytest.raises(ValueError, match="config field `max_degenerate_steps_in_a_row`"):
        train_online_dpo.main(["--preset", "cpu_tiny", "--max_degenerate_steps_in_a_row", "-1"])
