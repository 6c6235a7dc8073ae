"""The online trainer end to end on the tiny model: validation, learning (two-sided), ties, NaN
handling, exact resume, SIGTERM, and 2-process DDP / FSDP2 launches."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

import train_online_dpo
from conftest import ROOT

SCRIPT = os.path.join(ROOT, "train_online_dpo.py")


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def eval_rewards(rows):
    return [r["eval/reward_mean"] for r in rows if "eval/reward_mean" in r]


def lora(output_dir):
    return load_file(os.path.join(output_dir, "lora", "pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("flag,value,field", [
    ("samples_per_prompt", "1", "samples_per_prompt"),
    ("prompts_per_step", "0", "prompts_per_step"),
    ("micro_batch_pairs", "0", "micro_batch_pairs"),
    ("beta", "0", "beta"),
    ("beta", "-5", "beta"),
    ("beta", "nan", "beta"),
    ("beta", "inf", "beta"),
    ("reward", "clip_score", "reward"),
    ("pair_strategy", "random", "pair_strategy"),
    ("sigma_scheme", "cosine", "sigma_scheme"),
    ("min_reward_margin", "-0.1", "min_reward_margin"),
    ("train_mode", "qlora", "train_mode"),
    ("sharding", "zero3", "sharding"),
    ("dtype", "int8", "dtype"),
    ("height", "50", "height"),
    ("width", "0", "width"),
    ("num_inference_steps", "0", "num_inference_steps"),
    ("eval_inference_steps", "0", "eval_inference_steps"),
    ("max_sequence_length", "2000", "max_sequence_length"),
    ("true_cfg_scale", "0.5", "true_cfg_scale"),
    ("rollout_chunk_size", "0", "rollout_chunk_size"),
    ("lora_rank", "0", "lora_rank"),
    ("lora_targets", " ", "lora_targets"),
    ("learning_rate", "0", "learning_rate"),
    ("max_grad_norm", "0", "max_grad_norm"),
    ("updates_per_rollout", "0", "updates_per_rollout"),
    ("max_steps", "0", "max_steps"),
    ("max_nonfinite_in_a_row", "0", "max_nonfinite_in_a_row"),
    ("eval_every", "-1", "eval_every"),
    ("checkpoint_every", "-1", "checkpoint_every"),
    ("checkpoints_total_limit", "-1", "checkpoints_total_limit"),
    ("max_eval_prompts", "-1", "max_eval_prompts"),
    ("lr_warmup_steps", "-1", "lr_warmup_steps"),
    ("sample_grid_every", "-1", "sample_grid_every"),
    ("eval_samples_per_prompt", "0", "eval_samples_per_prompt"),
    ("log_with", "mlflow", "log_with"),
    ("reward_kwargs", "{not json", "reward_kwargs"),
    ("train_data", "/nonexistent/prompts.parquet", "train_data"),
    ("eval_data", "/nonexistent/test.txt", "eval_data"),
    ("preset", "gpu_huge", "preset"),
    ("lora_init", "pissa", "lora_init"),  # rewrites the base weights: "adapters disabled" != base
    ("lora_init", "olora", "lora_init"),
    ("lora_init", "anything", "lora_init"),
    ("learning_rate", "inf", "learning_rate"),
    ("weight_decay", "inf", "weight_decay"),  # torch accepts inf (and rejects -0.1 only after the model loads)
    ("adam_beta1", "1", "adam_beta1"),
    ("adam_beta2", "-0.5", "adam_beta2"),
    ("adam_epsilon", "0", "adam_epsilon"),
    ("resume_from_checkpoint", "/nonexistent/checkpoint-5", "resume_from_checkpoint"),
    ("output_dir", "/dev/null/run", "output_dir"),  # a folder below a file: not writable, even for root
    ("objective", "ppo", "objective"),
    ("grpo_noise_level", "0", "grpo_noise_level"),  # a = 0: the transition has no density
    ("grpo_clip_range", "nan", "grpo_clip_range"),
    ("grpo_adv_clip", "-1", "grpo_adv_clip"),
    ("grpo_kl_weight", "-0.04", "grpo_kl_weight"),
    ("grpo_timestep_fraction", "1.5", "grpo_timestep_fraction"),
    ("grpo_timestep_fraction", "0.1", "grpo_timestep_fraction"),  # 4 steps x 0.1: no trained step
    ("grpo_sde_window", "3,2", "grpo_sde_window"),  # past the preset's 4 sampling steps
    ("grpo_sde_window", "two", "grpo_sde_window"),
    ("advantage_std", "batch", "advantage_std"),
    ("sigma_scheme", "sampler", "sigma_scheme"),  # dpo (the default objective) has no sampler scheme
    ("sigma_scheme", "shifted", "sigma_scheme"),
    ("dgpo_switch_ema_ref", "-1", "dgpo_switch_ema_ref"),
    ("eval_ema_decay", "1", "eval_ema_decay"),
    ("micro_batch_groups", "0", "micro_batch_groups"),
    ("dgpo_beta", "0", "dgpo_beta"),
    ("dgpo_kl_weight", "-1", "dgpo_kl_weight"),
    ("dgpo_clip_range", "nan", "dgpo_clip_range"),
    ("nft_beta", "-0.1", "nft_beta"),
    ("nft_adv_clip", "0", "nft_adv_clip"),
    ("nft_kl_weight", "inf", "nft_kl_weight"),
    ("nft_old_ema", "75,0.0075", "nft_old_ema"),
    ("awm_old_ema", "0,0.001,1.0", "awm_old_ema"),  # max decay 1 would freeze the old policy
    ("dgpo_old_ema", "a,b,c", "dgpo_old_ema"),
    ("awm_clip_range", "0", "awm_clip_range"),
    ("awm_adv_clip", "-5", "awm_adv_clip"),
    ("awm_weighting", "huber", "awm_weighting"),
    ("awm_kl_weight", "-0.1", "awm_kl_weight"),
    ("awm_old_kl_weight", "nan", "awm_old_kl_weight"),
])
def test_invalid_config_fails_before_any_model_loads(flag, value, field):
    start = time.perf_counter()
    with pytest.raises(ValueError, match=field):
        train_online_dpo.main(["--preset", "cpu_tiny", f"--{flag}", value] if flag != "preset" else ["--preset", value])
    assert time.perf_counter() - start < 5


def test_prompts_must_split_evenly_across_ranks():
    from run_config import parse_config

    config = parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, ["--preset", "cpu_tiny", "--prompts_per_step", "7"])
    train_online_dpo.validate(config, world_size=1)
    with pytest.raises(ValueError, match="prompts_per_step"):
        train_online_dpo.validate(config, world_size=2)


def test_recipe_defaults():
    c = train_online_dpo.Config()
    assert (c.pretrained, c.reward, c.height, c.width, c.samples_per_prompt, c.num_inference_steps) == \
        ("Qwen/Qwen-Image", "ocr", 512, 512, 16, 35)
    assert (c.true_cfg_scale, c.max_sequence_length, c.lora_rank, c.lora_alpha, c.learning_rate) == (1.0, 256, 64, 128, 3e-4)
    assert (c.weight_decay, c.max_grad_norm, c.beta, c.sigma_scheme, c.max_steps) == (1e-4, 1.0, 100.0, "", 300)
    import objectives  # "" = each objective's official scheme; DPO's is logit_normal
    assert [objectives.OBJECTIVES[n](c).sigma_scheme for n in ("dgpo", "nft", "awm")] == \
        ["sampler_first", "sampler", "sampler_stratified"]  # dgpo: official generate_shared_sampled_timesteps
    assert (c.advantage_std, c.drop_tied_groups, c.dgpo_switch_ema_ref, c.eval_with_ema) == ("global", False, 200, False)
    assert (c.eval_every, c.checkpoint_every, c.pair_strategy, c.lr_warmup_steps) == (20, 20, "best_worst", 0)
    import qwen_image

    assert tuple(c.lora_targets.split(",")) == qwen_image.RECIPE_LORA_TARGETS


@pytest.mark.slow
def test_every_group_tied_skips_the_update(tmp_path):
    """The real OCR reward reads no text in tiny random images: every group ties at 0."""
    out = str(tmp_path / "tie")
    train_online_dpo.main(["--preset", "cpu_tiny", "--output_dir", out, "--max_steps", "1", "--eval_every", "0",
                           "--reward", "ocr"])
    row = read_metrics(out)[0]
    assert row["pairs/kept"] == 0 and row["pairs/tie_groups_dropped"] == 8 and row["update/skipped_no_pairs"] == 1
    assert "dpo/loss" not in row
    weights = lora(out)
    assert all(torch.count_nonzero(v) == 0 for k, v in weights.items() if "lora_B" in k)  # still the init


@pytest.mark.slow
def test_nonfinite_loss_skips_the_update_and_stops_when_repeated(tmp_path, monkeypatch):
    import dpo_loss

    real = dpo_loss.diffusion_dpo_loss
    calls = {"n": 0}

    def nan_first_update(model_pred, ref_pred, target, beta, **levers):
        calls["n"] += 1
        loss, metrics = real(model_pred, ref_pred, target, beta, **levers)
        return (loss * float("nan") if calls["n"] == 1 else loss), metrics

    monkeypatch.setattr(dpo_loss, "diffusion_dpo_loss", nan_first_update)
    out = str(tmp_path / "nan")
    train_online_dpo.main(["--preset", "cpu_tiny", "--output_dir", out, "--max_steps", "2", "--eval_every", "0"])
    rows = [r for r in read_metrics(out) if "reward/mean" in r]
    assert rows[0]["update/nonfinite_skipped"] == 1 and "update/nonfinite_skipped" not in rows[1]
    assert all(torch.isfinite(v).all() for v in lora(out).values())

    monkeypatch.setattr(dpo_loss, "diffusion_dpo_loss",
                        lambda *a, **k: (real(*a, **k)[0] * float("nan"), real(*a, **k)[1]))
    with pytest.raises(FloatingPointError, match="2 non-finite updates in a row"):
        train_online_dpo.main(["--preset", "cpu_tiny", "--output_dir", str(tmp_path / "nan2"), "--max_steps", "3",
                               "--eval_every", "0", "--max_nonfinite_in_a_row", "2"])


# sum |w| and sum w of the LoRA after `cpu_tiny --max_steps 4 --eval_every 0`, from the pre-refactor trainer
DPO_FINGERPRINT = (1455.438775434537, -34.38773734509596)


@pytest.mark.slow
def test_resume_continues_exactly(tmp_path):
    common = ["--preset", "cpu_tiny", "--max_steps", "4", "--eval_every", "0", "--checkpoint_every", "2"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train_online_dpo.main(common + ["--output_dir", straight])
    train_online_dpo.main(common + ["--output_dir", split, "--max_steps", "2"])
    train_online_dpo.main(common + ["--output_dir", split, "--resume_from_checkpoint", "latest"])
    a, b = lora(straight), lora(split)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    # `--objective dpo` (the default) trains what the trainer trained before the objectives were
    # split out of it (policy.py / objectives.py): fingerprint of these 4 steps from the code before
    # that refactor (the weights were bit-identical there and after it on this machine)
    assert sum(float(v.double().abs().sum()) for v in a.values()) == pytest.approx(DPO_FINGERPRINT[0], rel=1e-6)
    assert sum(float(v.double().sum()) for v in a.values()) == pytest.approx(DPO_FINGERPRINT[1], rel=1e-5)
    losses = lambda d: [r["dpo/loss"] for r in read_metrics(d) if "dpo/loss" in r]
    assert losses(split) == pytest.approx(losses(straight), abs=1e-6)


def test_a_run_takes_another_runs_step_0_eval_and_logs_the_same_gains(tmp_path):
    from run_config import ConfigError

    common = ["--preset", "cpu_tiny", "--max_steps", "2", "--eval_every", "2", "--checkpoint_every", "0",
              "--sample_grid_every", "0", "--max_eval_prompts", "4", "--eval_samples_per_prompt", "2"]
    own, taken = str(tmp_path / "own"), str(tmp_path / "taken")
    train_online_dpo.main(common + ["--output_dir", own])
    train_online_dpo.main(common + ["--output_dir", taken, "--eval_baseline", own, "--seed", "1"])
    (own_start, own_end), (start, end) = [[r for r in read_metrics(d) if "eval/rewards" in r] for d in (own, taken)]
    assert start["eval/rewards"] == own_start["eval/rewards"] and start["eval/taken_from"] == os.path.abspath(own)
    assert not os.path.exists(os.path.join(taken, "samples", "eval-000000.png"))  # no eval ran at step 0
    assert end["eval/rewards"] != own_end["eval/rewards"]  # another seed trained another policy
    diffs = [a - b for a, b in zip(end["eval/rewards"], own_start["eval/rewards"])]
    # ... and its gain is paired with the taken eval
    assert end["eval/reward_gain"] == pytest.approx(sum(diffs) / len(diffs), abs=1e-12)
    for flag, value, named in (("--eval_samples_per_prompt", "1", "eval_samples_per_prompt: 2 there, 1 here"),
                               ("--height", "32", "height: 64 there, 32 here")):
        with pytest.raises(ConfigError, match="eval_baseline") as error:
            train_online_dpo.main(common + ["--output_dir", str(tmp_path / "x"), "--eval_baseline", own, flag, value])
        assert named in str(error.value)
    bare = tmp_path / "bare"  # a run folder without a step-0 eval, and no run folder at all
    bare.mkdir()
    shutil.copy(os.path.join(own, "config.json"), bare / "config.json")
    for where, says in ((bare, "no step-0 eval"), (tmp_path / "nowhere", "does not exist")):
        with pytest.raises(ConfigError, match=f"eval_baseline.*{says}"):
            train_online_dpo.main(common + ["--output_dir", str(tmp_path / "x"), "--eval_baseline", str(where)])
    # a baseline run killed mid-write (a cut-off last line) still gives its step-0 eval; a damaged
    # config.json is a clear error
    with open(os.path.join(own, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "reward/me')
    train_online_dpo.main(common + ["--output_dir", str(tmp_path / "again"), "--eval_baseline", own])
    assert [r for r in read_metrics(str(tmp_path / "again")) if "eval/rewards" in r][0]["eval/rewards"] == \
        own_start["eval/rewards"]
    shutil.copy(os.path.join(own, "metrics.jsonl"), bare / "metrics.jsonl")
    (bare / "config.json").write_text("{broken")
    with pytest.raises(ConfigError, match="eval_baseline.*not valid JSON"):
        train_online_dpo.main(common + ["--output_dir", str(tmp_path / "x"), "--eval_baseline", str(bare)])


@pytest.mark.slow
def test_sigterm_writes_a_loadable_checkpoint(tmp_path):
    out = str(tmp_path / "term")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, SCRIPT, "--preset", "cpu_tiny", "--output_dir", out, "--max_steps", "500",
                             "--eval_every", "0", "--checkpoint_every", "0"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-2000:]
    checkpoints = [d for d in os.listdir(out) if d.startswith("checkpoint-")]
    assert len(checkpoints) == 1 and not [d for d in os.listdir(out) if d.startswith(".checkpoint")]
    step = int(checkpoints[0].split("-")[1])
    assert 1 <= step < 500
    train_online_dpo.main(["--preset", "cpu_tiny", "--output_dir", out, "--max_steps", str(step + 1),
                           "--eval_every", "0", "--resume_from_checkpoint", os.path.join(out, checkpoints[0])])
    assert read_metrics(out)[-2]["step"] == step + 1


@pytest.mark.slow
def test_a_second_ctrl_c_forces_the_exit(tmp_path):
    """First SIGINT: a clean stop is requested (message); a second one exits at once: one line, 130."""
    out = str(tmp_path / "int")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--preset", "cpu_tiny", "--output_dir", out, "--max_steps", "500",
                             "--eval_every", "0", "--checkpoint_every", "0"], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert "Traceback" not in err, err
    if proc.returncode == 0:  # the first SIGINT came during a rollout / reward: abandoned, saved and gone in 0.3 s
        assert "SIGINT: abandoning the rollout / reward / eval in progress" in err
        assert [d for d in os.listdir(out) if d.startswith("checkpoint-")]
        return
    assert proc.returncode == 130, err[-2000:]
    assert "SIGINT: stopping after this step with a checkpoint" in err or "SIGINT: abandoning" in err
    assert "interrupted (second SIGINT: stopping now, without a checkpoint)" in err, err
    assert not [d for d in os.listdir(out) if d.startswith("checkpoint-")]  # forced: no checkpoint written


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["none", "fsdp2"])
def test_two_process_launch(tmp_path, tiny_dir, sharding):
    """2 CPU processes (gloo): DDP through accelerate, or FSDP2 fully_shard."""
    out = str(tmp_path / sharding)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
           "--preset", "cpu_tiny", "--output_dir", out, "--max_steps", "2", "--eval_every", "2",
           "--checkpoint_every", "2", "--sharding", sharding, "--lr_warmup_steps", "8"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = read_metrics(out)
    steps = [r for r in rows if "data/prompt_uids" in r]
    assert len(steps) == 2
    # warm-up counts optimizer steps (2 per rollout batch), not optimizer steps x processes
    assert [r["lr"] for r in steps] == pytest.approx([3e-2 * 2 / 8, 3e-2 * 4 / 8], rel=1e-12)
    for r in steps:  # 8 prompts per step: rank 0 took 4, rank 1 the other 4
        uids = r["data/prompt_uids"]
        assert len(uids) == 8 and not set(uids[:4]) & set(uids[4:])
        assert r["pairs/kept"] == 8
    checksums = rows[-1]["final/param_checksums"]
    assert len(checksums) == 2 and checksums[0] == checksums[1]
    # the saved LoRA loads into a fresh pipeline and changes its prediction
    import qwen_image as qi

    pipe = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    x = torch.randn(1, 16, 64, generator=torch.Generator().manual_seed(0))
    embeds, mask = qi.PromptCache(pipe, 64)(["a cat"])
    with torch.no_grad():
        before = qi.predict_velocity(pipe.transformer, x, torch.tensor([0.5]), embeds, mask, 64, 64)
        pipe.load_lora_weights(os.path.join(out, "lora"))
        after = qi.predict_velocity(pipe.transformer, x, torch.tensor([0.5]), embeds, mask, 64, 64)
    assert (after - before).abs().max() > 1e-4


@pytest.mark.slow
def test_evaluate_reproduces_the_trainers_eval_through_diffusers_lora_loading(tmp_path):
    """In bf16 (frozen weights bf16, LoRA fp32 in both): the harder case; fp32 is the same code path."""
    import evaluate

    out = str(tmp_path / "run")
    # 4 x 4 rollouts a step and 8 eval prompts (the preset: 8 x 8 and 16): bf16 matmuls are slow on a CPU,
    # and the smaller run takes the same path
    train_online_dpo.main(["--preset", "cpu_tiny", "--output_dir", out, "--max_steps", "3", "--eval_every", "3",
                           "--dtype", "bfloat16", "--prompts_per_step", "4", "--samples_per_prompt", "4",
                           "--max_eval_prompts", "8"])
    trainer_eval = eval_rewards(read_metrics(out))
    # --run_dir alone: the run's config.json gives every eval setting, lora_dir and output_dir
    results = evaluate.main(["--run_dir", out])
    assert results["base"]["reward_mean"] == pytest.approx(trainer_eval[0], abs=1e-6)
    assert results["lora"]["reward_mean"] == pytest.approx(trainer_eval[-1], abs=1e-6)
    saved = json.load(open(os.path.join(out, "eval", "eval.json")))
    assert len(saved["per_prompt"]) == 8 * 4 and saved["reward_gain"] == pytest.approx(trainer_eval[-1] - trainer_eval[0], abs=1e-6)
    assert os.path.exists(os.path.join(out, "eval", "grid.png"))
    # the trainer's preset reproduces the same numbers; explicit flags win over the run's config
    from run_config import parse_config

    config = parse_config(evaluate.EvalConfig, evaluate.PRESETS, ["--preset", "cpu_tiny"])
    assert (config.pretrained, config.num_inference_steps, config.samples_per_prompt, config.height) == ("tiny", 4, 4, 64)
    flagged = parse_config(evaluate.EvalConfig, evaluate.PRESETS, ["--run_dir", out, "--max_prompts", "3"],
                           defaults=evaluate.run_dir_defaults(out))
    assert (flagged.max_prompts, flagged.lora_dir, flagged.reward) == (3, os.path.join(out, "lora"), "brightness")
    with pytest.raises(ValueError, match="config field `run_dir`"):
        evaluate.main(["--run_dir", str(tmp_path)])


def test_readme_documents_every_knob_and_ci_runs_its_test_command():
    import dataclasses

    import evaluate
    import train_offline_dpo
    from data_process import make_offline_pairs

    readme = open(os.path.join(ROOT, "README.md")).read()
    docs_dir = os.path.join(ROOT, "docs")
    docs = readme + "".join(open(os.path.join(docs_dir, name)).read() for name in sorted(os.listdir(docs_dir))
                            if name.endswith(".md"))  # the README and its docs/ pages
    for config_cls in (train_online_dpo.Config, evaluate.EvalConfig, train_offline_dpo.Config,
                       make_offline_pairs.PairsConfig):
        missing = [f.name for f in dataclasses.fields(config_cls) if f"`{f.name}`" not in docs]
        assert not missing, f"README and docs/ do not document {config_cls.__name__} fields {missing}"
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "python -m pytest -q tests" in readme and ci.strip().endswith("python -m pytest -q tests")


@pytest.mark.slow
def test_fsdp2_bf16_resume_continues_exactly(tmp_path):
    """Sharded, bf16 frozen weights with fp32 LoRA: 3 steps straight == 2 steps, resume, 1 step."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}

    def launch(out, *extra):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT,
               "--preset", "cpu_tiny", "--output_dir", out, "--eval_every", "0", "--checkpoint_every", "2",
               "--sharding", "fsdp2", "--dtype", "bfloat16", "--prompts_per_step", "4", "--samples_per_prompt", "4",
               *extra]  # 4 x 4 rollouts a step instead of 8 x 8: bf16 is slow on a CPU, and resume is exact at any size
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]

    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    launch(straight, "--max_steps", "3")
    launch(split, "--max_steps", "2")
    launch(split, "--max_steps", "3", "--resume_from_checkpoint", "latest")
    a, b = lora(straight), lora(split)
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    assert read_metrics(split)[-1]["final/param_checksums"] == read_metrics(straight)[-1]["final/param_checksums"]


@pytest.mark.slow
def test_full_parameter_mode_saves_a_diffusers_transformer(tmp_path, tiny_dir):
    from diffusers import QwenImageTransformer2DModel

    import qwen_image as qi

    out = str(tmp_path / "full")
    train_online_dpo.main(["--preset", "cpu_tiny", "--output_dir", out, "--max_steps", "2", "--eval_every", "0",
                           "--train_mode", "full", "--learning_rate", "1e-3"])
    trained = QwenImageTransformer2DModel.from_pretrained(os.path.join(out, "transformer"), dtype=torch.float32)
    base = qi.load_pipeline(tiny_dir, dtype=torch.float32).transformer
    changed = [n for n, p in trained.named_parameters() if not torch.equal(p, base.get_parameter(n))]
    assert changed and not any(n.startswith(m) for n in changed for m in qi.dead_text_stream_modules(base))
    assert read_metrics(out)[0]["pairs/kept"] == 8


@pytest.mark.slow
def test_trackers_get_images_and_tables_and_the_lora_folder_has_a_model_card(tmp_path, monkeypatch, tiny_dir):
    """wandb (offline without a key) and tensorboard each get the eval grid, the chosen-vs-rejected
    grid and the eval table; the tensorboard run also trains on a weighted two-component reward."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    common = ["--preset", "cpu_tiny", "--max_steps", "1", "--eval_every", "1", "--max_eval_prompts", "2",
              "--sample_grid_every", "1", "--hub_model_id", "someone/tiny-dpo", "--hub_token", "hf_secret123"]
    for tracker in ("wandb", "tensorboard"):
        out = tmp_path / tracker
        extra = ["--reward", "brightness:1.0,jpeg_compressibility:0.5"] if tracker == "tensorboard" else []
        train_online_dpo.main(common + ["--output_dir", str(out), "--log_with", tracker] + extra)
        files = [os.path.join(d, f) for d, _, fs in os.walk(out) for f in fs]
        if tracker == "wandb":
            assert os.environ["WANDB_MODE"] == "offline"
            run_dir = next(d for d, _, _ in os.walk(out) if os.path.basename(d).startswith("offline-run-"))
            media = [os.path.relpath(f, run_dir) for f in files if f.startswith(run_dir) and "/media/" in f]
            for expected in ("media/images/eval/grid_", "media/images/train/pairs_", "media/table/eval/samples_"):
                assert any(m.startswith(os.path.join("files", expected)) for m in media), (expected, media)
            assert any(m.endswith(".png") and "eval/grid" in m for m in media)
        else:
            from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

            events = next(f for f in files if "events.out.tfevents" in f)
            accumulator = EventAccumulator(events, size_guidance={"images": 0, "tensors": 0})
            accumulator.Reload()
            assert {"eval/grid", "train/pairs"} <= set(accumulator.Tags()["images"])
            grids = accumulator.Images("eval/grid")
            assert [g.step for g in grids] == [0, 1]  # the step-0 eval and the one after step 1
            assert (grids[-1].width, grids[-1].height) == (8 * 128, 142)  # 2 prompts x 4 samples: one row
            assert "eval/samples/text_summary" in accumulator.Tags()["tensors"]
            row = [r for r in read_metrics(out) if "reward/mean" in r][0]
            for name in ("brightness", "jpeg_compressibility"):
                assert f"reward/{name}/mean" in row and f"eval/{name}/reward_mean" in read_metrics(out)[0]
            assert row["reward/mean"] == pytest.approx(row["reward/brightness/mean"]
                                                       + 0.5 * row["reward/jpeg_compressibility/mean"], abs=1e-9)
    # the model card next to the LoRA; the token never lands on disk
    lora_dir = tmp_path / "wandb" / "lora"
    card = open(lora_dir / "README.md").read()
    metadata = card.split("---")[1]
    assert "library_name: diffusers" in metadata and "base_model" not in metadata and "- diffusion-dpo" in metadata
    assert "url: eval_grid.png" in metadata and (lora_dir / "eval_grid.png").exists()
    evals = eval_rewards(read_metrics(tmp_path / "wandb"))
    assert f"| before | 0 | {evals[0]:.4f}" in card and f"| after | 1 | {evals[-1]:.4f}" in card
    assert '"learning_rate": 0.03' in card and "pipe.load_lora_weights('someone/tiny-dpo')" in card
    for d, _, fs in os.walk(tmp_path):
        for f in fs:
            if f.endswith((".json", ".md", ".jsonl", ".yaml")):
                assert "hf_secret123" not in open(os.path.join(d, f), errors="ignore").read(), f
    import qwen_image as qi

    pipe = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    pipe.load_lora_weights(str(lora_dir))  # diffusers reads the folder with the card in it
    assert any("lora" in name for name, _ in pipe.transformer.named_parameters())


def test_push_to_hub_needs_a_repository_id_and_without_a_token_says_why_it_did_not_upload(tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="config field `hub_model_id`: push_to_hub needs"):
        train_online_dpo.main(["--preset", "cpu_tiny", "--push_to_hub", "true"])
    import model_card

    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr("huggingface_hub.constants.HF_TOKEN_PATH", str(tmp_path / "no-token"))
    assert model_card.push_to_hub(str(tmp_path), "someone/tiny-dpo") is None
    assert "push_to_hub: no Hugging Face token" in capsys.readouterr().out


def test_derived_seeds_never_collide_over_the_recipe_grid_nor_between_run_seeds():
    """Recipe: 300 steps x 4 ranks x 32/4 prompts x 16 samples = 128 rollouts per rank and step."""
    import prompt_data

    def grid(seed):
        return [s for step in range(300) for rank in range(4) for s in prompt_data.rollout_seeds(seed, step, rank, 128)]

    run0, run1 = grid(0), grid(1)
    assert len(set(run0)) == len(run0) == 300 * 4 * 128
    assert not set(run0) & set(run1)
    noise = {prompt_data.dpo_noise_seed(seed, step, rank, 0, u) for seed in (0, 1) for step in range(300) for rank in range(4)
             for u in range(2)}
    assert len(noise) == 2 * 300 * 4 * 2 and not noise & (set(run0) | set(run1))
    assert all(0 <= s < 2**63 for s in run0[:1000])


@pytest.mark.parametrize("train_mode", ["lora", "full"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_policy_and_reference_agree_exactly_at_step_0(tiny_dir, train_mode, dtype):
    """Same precision for policy and reference in every mode: the DPO margin starts at exactly 0."""
    from accelerate import Accelerator

    import dpo_loss
    import qwen_image as qi
    import run_config
    from policy import Policy

    config = run_config.parse_config(train_online_dpo.Config, train_online_dpo.PRESETS,
                                     ["--preset", "cpu_tiny", "--train_mode", train_mode, "--dtype", dtype])
    pipe = qi.load_pipeline(tiny_dir, dtype=getattr(torch, dtype))
    cache = qi.PromptCache(pipe, 64)
    policy = Policy(config, pipe, Accelerator(cpu=True))
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 16, 64, generator=g)
    noise, sigmas = torch.randn(x0.shape, generator=g), torch.rand(4, generator=g)
    embeds, mask = cache(["a cat", "a cat", 'A sign that says "Open"', 'A sign that says "Open"'], dtype=policy.dtype)
    args = (x0, noise, sigmas, embeds, mask)
    ref = policy.reference_velocity(*args)
    pred = policy.velocity(*args)
    _, metrics = dpo_loss.diffusion_dpo_loss(pred, ref, dpo_loss.velocity_target(x0, noise), beta=2000.0)
    assert torch.equal(pred, ref) and metrics["inside_mean"] == 0.0


# ---------------------------------------------------------------------------------- run folder and resume rules

SMALL = ["--preset", "cpu_tiny", "--prompts_per_step", "2", "--samples_per_prompt", "2", "--eval_every", "0"]


def test_resume_and_overwrite_exclude_each_other_and_bad_prompt_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="overwrite_output_dir"):
        train_online_dpo.main(SMALL + ["--output_dir", str(tmp_path / "x"), "--overwrite_output_dir", "true",
                                       "--resume_from_checkpoint", "latest"])
    import prompt_data

    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"a cat\nlatin-1 caf\xe9\n")
    with pytest.raises(ValueError, match="prompts.txt: line 2 is not UTF-8"):
        prompt_data.load_prompts(str(bad))


def test_evaluate_checks_its_output_folder_first():
    import evaluate

    start = time.perf_counter()
    with pytest.raises(ValueError, match="config field `output_dir`: folder '/dev/null/eval' is not writable"):
        evaluate.main(["--pretrained", "tiny", "--prompts", os.path.join(ROOT, "data", "tiny_prompts.txt"),
                       "--reward", "brightness", "--output_dir", "/dev/null/eval"])
    assert time.perf_counter() - start < 5


def test_second_stop_signal_interrupts_at_once():
    from run_lifecycle import StopFlag

    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        flag = StopFlag()
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.raised
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler runs at the next bytecode boundary
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.slow
def test_run_folder_rules_config_check_and_damaged_checkpoints(tmp_path, capsys):
    out = str(tmp_path / "run")
    base = SMALL + ["--output_dir", out, "--checkpoint_every", "1"]
    # `latest` with nothing to resume says so, then starts fresh
    train_online_dpo.main(base + ["--max_steps", "2", "--resume_from_checkpoint", "latest"])
    assert "no complete checkpoint in" in capsys.readouterr().out
    # a fresh run into the folder refuses, naming what is there
    with pytest.raises(FileExistsError, match=r"holds a run \(config.json, metrics.jsonl, lora, samples, checkpoint-1, "
                                              r"checkpoint-2\)"):
        train_online_dpo.main(base + ["--max_steps", "3"])
    # a resume that changes what the weights mean is refused, naming every changed field
    with pytest.raises(ValueError, match=r"lora_rank: 8 -> 4; lora_alpha: 8 -> 16"):
        train_online_dpo.main(base + ["--max_steps", "3", "--resume_from_checkpoint", "latest", "--lora_rank", "4",
                                      "--lora_alpha", "16"])
    # ... as is one that changes the objective's own knobs (the script passes them to launch)
    with pytest.raises(ValueError, match=r"weight-defining settings \(beta: 100.0 -> 50.0\)"):
        train_online_dpo.main(base + ["--max_steps", "3", "--resume_from_checkpoint", "latest", "--beta", "50"])
    # a checkpoint without its config (older versions): the strict load names the mismatch in one line
    os.rename(os.path.join(out, "checkpoint-2", "config.json"), os.path.join(out, "config-2.json"))
    with pytest.raises(ValueError, match=r"does not fit the trainable parameters .*saved \(8, "):
        train_online_dpo.main(base + ["--max_steps", "3", "--resume_from_checkpoint", "latest", "--lora_rank", "4"])
    os.rename(os.path.join(out, "config-2.json"), os.path.join(out, "checkpoint-2", "config.json"))
    # a cut-off newest checkpoint: named, skipped by `latest`, refused as an explicit path
    optimizer = os.path.join(out, "checkpoint-2", "optimizer.pt")
    data = open(optimizer, "rb").read()
    open(optimizer, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"resume_from_checkpoint.*checkpoint-2/optimizer.pt is damaged"):
        train_online_dpo.main(base + ["--max_steps", "3", "--resume_from_checkpoint", os.path.join(out, "checkpoint-2")])
    os.makedirs(os.path.join(out, ".checkpoint-3-abcd"))  # left by a kill while saving
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "dpo/lo')  # cut off mid-write
    capsys.readouterr()
    train_online_dpo.main(base + ["--max_steps", "3", "--resume_from_checkpoint", "latest"])
    printed = capsys.readouterr().out
    assert "skipping" in printed and "checkpoint-2/optimizer.pt is damaged" in printed
    assert "resumed from" in printed and "checkpoint-1 at step 1" in printed
    assert not [d for d in os.listdir(out) if d.startswith(".checkpoint")]
    rows = read_metrics(out)
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2, 3]
    assert [r["step"] for r in rows if "final/param_checksums" in r] == [3]  # the first leg's final row is gone
    # an explicit overwrite replaces the old run
    train_online_dpo.main(SMALL + ["--output_dir", out, "--max_steps", "1", "--overwrite_output_dir", "true"])
    assert sorted(os.listdir(out)) == [".lock", "config.json", "lora", "metrics.jsonl", "samples"]  # .lock: lock_run_dir
    assert [r["step"] for r in read_metrics(out)] == [1, 1]


@pytest.mark.slow
def test_nonfinite_weights_stop_the_run_and_nothing_is_saved(tmp_path, monkeypatch):
    """adam_epsilon 0 (validation now refuses it; bypassed here) makes Adam divide 0 by 0 for lora_A,
    whose gradient is 0 while lora_B is 0: NaN weights after the first update."""
    monkeypatch.setattr(train_online_dpo, "validate", lambda config, world_size=1: None)
    from run_config import parse_config

    out = str(tmp_path / "nan")
    config = parse_config(train_online_dpo.Config, train_online_dpo.PRESETS,
                          SMALL + ["--output_dir", out, "--max_steps", "2", "--checkpoint_every", "1",
                                   "--adam_epsilon", "0"])
    with pytest.raises(FloatingPointError, match="step 0: trainable weights are non-finite"):
        train_online_dpo.train(config)
    assert not [d for d in os.listdir(out) if d.startswith(("checkpoint", ".checkpoint", "lora"))]


def test_paired_gain_is_the_mean_and_standard_error_of_per_image_differences():
    import statistics

    import evaluation

    after, before = [1.0, 0.5, 1.0, 0.0, 0.75], [0.5, 0.5, 1.0, 1.0, 0.25]
    gain = evaluation.paired_gain(after, before, exact_match=True)
    diffs = [a - b for a, b in zip(after, before)]  # 0.5, 0, 0, -1, 0.5
    exact_diffs = [float(a == 1.0) - float(b == 1.0) for a, b in zip(after, before)]  # 1, 0, 0, -1, 0
    assert gain["eval/reward_gain"] == pytest.approx(0.0)
    assert gain["eval/reward_gain_se"] == pytest.approx(statistics.stdev(diffs) / 5 ** 0.5)
    assert gain["eval/exact_match_gain"] == pytest.approx(0.0)
    assert gain["eval/exact_match_gain_se"] == pytest.approx(statistics.stdev(exact_diffs) / 5 ** 0.5)
    assert set(evaluation.paired_gain(after, before, exact_match=False)) == {"eval/reward_gain", "eval/reward_gain_se"}
    text = evaluation.format_eval({"eval/reward_mean": 0.65, "eval/reward_se": 0.02, "eval/images": 5.0, "eval/exact_match": 0.4,
                                   "eval/exact_match_se": 0.2, **evaluation.paired_gain([1.0, 1.0], [0.5, 1.0], exact_match=True)})
    assert text.endswith("since the first eval (paired): reward +0.2500 ± 0.25, exact match +0.500 ± 0.5")
