"""The group objectives (dgpo, nft, awm) in the online trainer: their update on fixed rollouts (1
process, 2-process DDP and FSDP2 agree), the old adapter (checkpointed, restored, never exported),
the non-finite guard, exact resume and config rules. Their two-sided learning tests run on the text
world with the real OCR reward (tests/test_text_world.py)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import objective_worker
import train_online_dpo
from conftest import ROOT

GROUP_OBJECTIVES = ["dgpo", "nft", "awm", "grpo"]
WORKER = os.path.join(ROOT, "tests", "objective_worker.py")


def lora(output_dir):
    return load_file(os.path.join(output_dir, "lora", "pytorch_lora_weights.safetensors"))


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def one_process(tiny_dir, tmp_path_factory):
    """Each objective's 2 steps on the fixed rollouts, in this process."""
    out = str(tmp_path_factory.mktemp("objectives-1proc"))
    return out, {name: objective_worker.run(name, tiny_dir, out) for name in GROUP_OBJECTIVES}


@pytest.mark.parametrize("name", GROUP_OBJECTIVES)
def test_update_logs_its_diagnostics_and_exports_only_the_trained_adapter(one_process, name):
    out, logged = one_process[0], one_process[1][name]
    for metrics in logged:
        # group 1 of 4 ties: dropped and counted; 3 x K = 12 samples train
        assert metrics["adv/groups"] == 4 and metrics["adv/zero_variance_groups_dropped"] == 1
        assert metrics["adv/samples_kept"] == 12 and 0 < metrics["adv/abs_mean"] <= 1  # group std 1
        assert metrics["update/grad_norm"] > 0 and torch.isfinite(torch.tensor(metrics[f"{name}/loss"]))
    expected = {"dgpo": ["implicit_acc", "z_mean", "reward_pos", "reward_neg", "clip_frac", "kl"],
                "nft": ["r_mean", "loss_pos", "loss_neg", "old_deviation", "kl"],
                "awm": ["ratio_mean", "clip_frac", "logp_mean", "kl", "old_kl"],
                "grpo": ["ratio_mean", "clip_frac", "approx_kl", "log_prob_mean", "kl", "trained_steps"]}[name]
    assert all(f"{name}/{key}" in logged[-1] for key in expected), sorted(logged[-1])
    if name == "grpo":  # no old adapter: the old log-probs are the rollout's; ratio 1 at the first update
        assert "old/ema_decay" not in logged[-1]
        assert logged[-1]["grpo/trained_steps"] == 2 and logged[1]["grpo/approx_kl"] > 1e-10  # the policy moved
        return
    assert logged[-1]["old/ema_decay"] == 0.5
    weights = lora(os.path.join(out, name))
    assert weights and not any(".old." in k or "default" in k for k in weights)
    assert any(v.abs().max() > 0 for k, v in weights.items() if "lora_B" in k)  # trained


def test_the_exported_lora_loads_into_a_fresh_pipeline_through_diffusers(one_process, tiny_dir):
    import qwen_image as qi

    out = os.path.join(one_process[0], "nft", "lora")
    pipe = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    embeds, mask = qi.PromptCache(pipe, 64)(["a cat"])
    with torch.no_grad():
        before = qi.predict_velocity(pipe.transformer, x, torch.tensor([0.5]), embeds, mask, 64, 64)
        pipe.load_lora_weights(out)
        after = qi.predict_velocity(pipe.transformer, x, torch.tensor([0.5]), embeds, mask, 64, 64)
    assert (after - before).abs().max() > 1e-5
    assert list(pipe.transformer.peft_config) == ["default_0"]  # one adapter: the trained one


@pytest.mark.slow
def test_two_processes_equal_one_process(one_process, tiny_dir, tmp_path):
    """Each rank holds half the groups; noise and sigma are drawn per group, so 2-process DDP (every
    objective) and FSDP2 (nft: old adapter, reference and EMA on sharded weights; grpo: a pass per
    trained step, reference at the recorded states) train exactly what 1 process trains on the same
    rollouts (up to summation order; grpo measured 3e-8). One launch."""
    single, logged_by_name = one_process
    runs = [("none", name) for name in GROUP_OBJECTIVES] + [("fsdp2", "nft"), ("fsdp2", "grpo")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", WORKER,
           tiny_dir, str(tmp_path), *[f"{sharding}:{name}" for sharding, name in runs]]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for sharding, name in runs:
        a, b = lora(os.path.join(single, name)), lora(os.path.join(tmp_path, sharding, name))
        assert a.keys() == b.keys()
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 2e-6, (sharding, name)
        two = json.load(open(os.path.join(tmp_path, sharding, name, "metrics.json")))
        for key in ("adv/samples_kept", "adv/zero_variance_groups_dropped", f"{name}/loss"):
            assert two[-1][key] == pytest.approx(logged_by_name[name][-1][key], rel=1e-4, abs=1e-6), (sharding, name, key)


@pytest.mark.parametrize("name,loss", [("dgpo", "dgpo_loss"), ("nft", "nft_loss"), ("awm", "awm_loss"),
                                       ("grpo", "grpo_loss")])
def test_nonfinite_loss_skips_the_update(tiny_dir, tmp_path, monkeypatch, name, loss):
    import flow_grpo
    import group_losses

    module = flow_grpo if name == "grpo" else group_losses
    real = getattr(module, loss)
    calls = {"n": 0}
    per_update = 3 * (2 if name == "grpo" else 1)  # 3 kept groups, 1 per micro-batch (grpo: x 2 trained steps)

    def nan_in_the_first_update(*args, **kwargs):
        calls["n"] += 1
        value, metrics = real(*args, **kwargs)
        if calls["n"] > per_update:
            return value, metrics
        return value * float("nan"), {**metrics, "loss": float("nan")}

    monkeypatch.setattr(module, loss, nan_in_the_first_update)
    logged = objective_worker.run(name, tiny_dir, str(tmp_path))
    assert logged[0]["update/nonfinite_skipped"] == 1 and "update/nonfinite_skipped" not in logged[1]
    assert f"{name}/loss" in logged[0]  # the step's second update went through
    weights = lora(os.path.join(tmp_path, name))
    assert all(torch.isfinite(v).all() for v in weights.values())


TINY_RUN = ["--preset", "cpu_tiny", "--prompts_per_step", "2", "--samples_per_prompt", "4", "--micro_batch_groups", "1",
            "--eval_every", "0", "--sample_grid_every", "0", "--checkpoint_every", "1",
            "--nft_old_ema", "0,0.5,0.5", "--awm_old_ema", "0,0.5,0.5", "--dgpo_old_ema", "0,0.5,0.5",
            "--dgpo_clip_range", "0.05"]


@pytest.mark.slow
@pytest.mark.parametrize("name", GROUP_OBJECTIVES)
def test_resume_continues_exactly_with_the_old_adapter(tmp_path, name):
    """2 steps straight == 1 step, resume, 1 step. The old adapter (an EMA that moves at once
    here) is in the checkpoint: were it not restored, the second step's loss would differ. grpo has
    none: its SDE trajectory is regenerated from the seeds by the restored policy."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    common = TINY_RUN + ["--objective", name]
    train_online_dpo.main(common + ["--output_dir", straight, "--max_steps", "2"])
    train_online_dpo.main(common + ["--output_dir", split, "--max_steps", "1"])
    saved = load_file(os.path.join(split, "checkpoint-1", "trainable.safetensors"))
    assert any(".old." in k for k in saved) == (name != "grpo")  # grpo: no old adapter; its trajectory is regenerated
    train_online_dpo.main(common + ["--output_dir", split, "--max_steps", "2", "--resume_from_checkpoint", "latest"])
    a, b = lora(straight), lora(split)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    losses = lambda d: [r[f"{name}/loss"] for r in read_metrics(d) if f"{name}/loss" in r]
    assert len(losses(straight)) == 2 and losses(split) == pytest.approx(losses(straight), abs=1e-6)


def test_objective_rules_before_any_model_loads_and_on_resume():
    import time

    import checkpoints
    import run_config
    from run_config import parse_config

    start = time.perf_counter()
    for objective in ("nft", "awm"):  # the old policy is a LoRA adapter
        with pytest.raises(ValueError, match=r"config field `train_mode`: must be 'lora' with objective"):
            train_online_dpo.main(["--preset", "cpu_tiny", "--objective", objective, "--train_mode", "full"])
    with pytest.raises(ValueError, match="train_mode"):
        train_online_dpo.main(["--preset", "cpu_tiny", "--objective", "dgpo", "--dgpo_clip_range", "0.01",
                               "--train_mode", "full"])
    assert time.perf_counter() - start < 5
    # DGPO without its clip needs no old adapter, so full mode is fine
    train_online_dpo.validate(parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, [
        "--preset", "cpu_tiny", "--objective", "dgpo", "--train_mode", "full"]))

    # on resume: the objective and its own knobs must match the checkpoint's; other objectives' knobs may change
    def changes(saved, config):  # what the online trainer compares: the shared fields and its objective's knobs
        return checkpoints.config_changes(saved, config, train_online_dpo.objective_knobs(config))

    config = parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, ["--preset", "cpu_tiny", "--objective", "nft"])
    saved = {**run_config.config_dict(config), "nft_beta": 0.3, "dgpo_beta": 5.0, "learning_rate": 1.0}
    assert changes(saved, config) == ["nft_beta: 0.3 -> 0.1"]
    assert changes({**saved, "objective": "dpo"}, config)[0] == "objective: 'dpo' -> 'nft'"
    dpo = parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, ["--preset", "cpu_tiny"])
    assert changes({**run_config.config_dict(dpo), "beta": 50.0, "nft_beta": 0.5}, dpo) == ["beta: 50.0 -> 100.0"]
    older = {k: v for k, v in run_config.config_dict(dpo).items() if k != "objective"}  # saved before objectives existed
    assert changes(older, dpo) == []  # a missing field counts as its default: dpo



def test_grpo_ratio_is_exactly_one_at_the_first_update_and_moves_after_it(tiny_dir, tmp_path):
    """The old log-probs are the sampler's (here the initial policy's SDE steps, computed in the same
    micro-batches): in fp32 the first update's recomputed log-probs equal them bit for bit, so every
    ratio is 1 and nothing is clipped even at the official clip range 1e-4. The second step's
    transitions are again the initial policy's, which the trained policy no longer is."""
    logged = objective_worker.run("grpo", tiny_dir, str(tmp_path), extra=["--updates_per_rollout", "1",
                                                                         "--grpo_clip_range", "1e-4"])
    first, second = logged
    assert first["grpo/ratio_mean"] == 1.0 and first["grpo/approx_kl"] == 0.0 and first["grpo/clip_frac"] == 0.0
    assert first["grpo/kl"] == 0.0  # the policy is the reference before its first step
    assert second["grpo/approx_kl"] > 0 and second["grpo/kl"] > 0
