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
OLD_ADAPTER_OBJECTIVES = ["dgpo", "nft", "awm"]  # those with an old (EMA) adapter; grpo has none
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
        # group 1 of 4 ties: trained with A = 0 (as the official scripts) and counted; 4 x K = 16 samples train.
        # grpo: its samples of advantage 0 are dropped (official train_sd3.py): 12 samples
        tied_trained, kept = (0, 12) if name == "grpo" else (1, 16)
        assert metrics["adv/groups"] == 4 and metrics["adv/tied_groups"] == 1
        assert metrics["adv/tied_groups_trained"] == tied_trained and metrics["adv/samples_kept"] == kept
        assert 0 < metrics["adv/abs_mean"] < 2
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
    # the first optimizer step's loss calls: its part (update_split disjoint) of 2 groups, 1 per micro-batch,
    # x the trained timesteps (dgpo, nft 3, awm 6 at 4 sampling steps); grpo: 6 of the 12 kept rows,
    # 4 per micro-batch, x 2 trained steps
    per_update = {"dgpo": 2 * 3, "nft": 2 * 3, "awm": 2 * 6, "grpo": 2 * 2}[name]

    def nan_in_the_first_update(*args, **kwargs):  # every group (the tied one too), 1 per micro-batch
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
            "--dgpo_clip_range", "0.05", "--eval_with_ema", "--updates_per_rollout", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("name", GROUP_OBJECTIVES)
def test_resume_continues_exactly_with_the_old_adapter(tmp_path, name):
    """2 steps straight == 1 step, resume, 1 step. The old adapter (an EMA that moves at once
    here) is in the checkpoint: were it not restored, the second step's loss would differ; so are the
    eval EMA (the export) and the optimizer-step count the EMA decays are computed from. grpo has no
    old adapter: its SDE trajectory is regenerated from the seeds by the restored policy."""
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    common = TINY_RUN + ["--objective", name]
    train_online_dpo.main(common + ["--output_dir", straight, "--max_steps", "2"])
    train_online_dpo.main(common + ["--output_dir", split, "--max_steps", "1"])
    saved = load_file(os.path.join(split, "checkpoint-1", "trainable.safetensors"))
    assert any(".old." in k for k in saved) == (name != "grpo") and any(".ema." in k for k in saved)
    train_online_dpo.main(common + ["--output_dir", split, "--max_steps", "2", "--resume_from_checkpoint", "latest"])
    a, b = lora(straight), lora(split)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    losses = lambda d: [r[f"{name}/loss"] for r in read_metrics(d) if f"{name}/loss" in r]
    assert len(losses(straight)) == 2 and losses(split) == pytest.approx(losses(straight), abs=1e-6)
    decays = lambda d: [r["old/ema_decay"] for r in read_metrics(d) if "old/ema_decay" in r]
    assert decays(split) == decays(straight) and len(decays(straight)) == (0 if name == "grpo" else 2)
    with open(os.path.join(split, "lora", "README.md")) as f:
        assert "EMA of the trained LoRA" in f.read()


def test_objective_rules_before_any_model_loads_and_on_resume():
    import time

    import checkpoints
    import run_config
    from run_config import parse_config

    start = time.perf_counter()
    for objective in ("nft", "awm"):  # the old policy is a LoRA adapter
        with pytest.raises(ValueError, match=r"config field `train_mode`: must be 'lora' with objective"):
            train_online_dpo.main(["--preset", "cpu_tiny", "--objective", objective, "--train_mode", "full"])
    # DGPO always keeps its EMA reference (official: rollouts from it after switch_ema_ref, clip or not)
    with pytest.raises(ValueError, match="train_mode"):
        train_online_dpo.main(["--preset", "cpu_tiny", "--objective", "dgpo", "--train_mode", "full"])
    for field, value in (("train_timesteps", "-1"), ("dgpo_first_steps_fraction", "0"), ("grpo_sde_window", "random:3")):
        with pytest.raises(ValueError, match=f"config field `{field}`"):  # random:3 needs 3 <= 4 steps // 2
            train_online_dpo.main(["--preset", "cpu_tiny", "--objective", "grpo", "--train_mode", "full",
                                   f"--{field}", value])
    assert time.perf_counter() - start < 5

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



def grpo_real_rollout_update(tiny_dir, extra):
    """A real rollout: qwen_image_rollout.rollout with the objective's SDERecorder on the tiny model in
    fp32 (4 prompts x K = 4, 4 steps: 3 trained, random rewards), then the update. -> (every
    grpo_loss call's metrics in order, the policy)."""
    import distributed
    import evaluation
    import flow_grpo
    import objectives
    import prompt_data
    import qwen_image as qi
    import qwen_image_rollout as qir
    from policy import Policy

    config = objective_worker.config_for("grpo", tiny_dir, "none", ["--grpo_clip_range", "1e-4", *extra])
    accelerator = distributed.make_accelerator(config)
    torch.manual_seed(config.seed)
    pipe = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    cache = qi.PromptCache(pipe, config.max_sequence_length)
    cache.warm(objective_worker.PROMPTS)
    objective = objectives.build(config)
    policy = Policy(config, pipe, accelerator)
    prompts = [p for p in objective_worker.PROMPTS for _ in range(4)]
    recorder = objective.recorder(step=0)
    pipe.transformer.eval()
    latents, _ = qir.rollout(pipe, cache, prompts, prompt_data.rollout_seeds(config.seed, 0, 0, len(prompts)),
                             evaluation.rollout_settings(config, config.num_inference_steps), decode=False,
                             scheduler_step=recorder.chunk_step)
    pipe.transformer.train()
    rewards = torch.rand(16, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    rollouts = objectives.Rollouts(latents=latents, rewards=rewards, group_ids=[f"{i // 4}:p" for i in range(16)],
                                   prompts=prompts, trajectory=recorder.result())
    assert rollouts.trajectory["log_probs"].shape == (16, 3)
    seen, real = [], flow_grpo.grpo_loss

    def spy(*args, **kwargs):
        value, metrics = real(*args, **kwargs)
        seen.append(metrics)
        return value, metrics

    flow_grpo.grpo_loss = spy
    try:
        objective.update(policy, rollouts, cache, 0)
    finally:
        flow_grpo.grpo_loss = real
    return seen, policy


def test_grpo_ratio_is_exactly_one_at_the_first_update_of_a_real_sde_rollout(tiny_dir):
    """Rollout chunks of 4 = the update's micro-batches (one group each, update_split all, 1 update):
    the recomputed log-probs equal the recorded ones bit for bit, so every ratio is exactly 1, nothing
    is clipped at the official clip range 1e-4 and the KL is 0 (the policy is the reference)."""
    seen, _ = grpo_real_rollout_update(tiny_dir, ["--rollout_chunk_size", "4", "--update_split", "all",
                                                  "--updates_per_rollout", "1"])
    assert len(seen) == 4 * 3  # 4 micro-batches x 3 trained steps
    assert all(m["ratio_mean"] == 1.0 and m["approx_kl"] == 0.0 and m["clip_frac"] == 0.0 and m["kl"] == 0.0
               for m in seen)


def test_grpo_second_optimizer_step_of_a_real_rollout_has_moved(tiny_dir):
    """The official split (disjoint, 2 optimizer steps of 8 rows over 2 micro-batches each): the first
    step's rows mix prompts of other lengths than the rollout's chunks (text padding: ~1e-8 apart, no
    clip at 1e-4); the second step's rows were sampled by the initial policy, which has moved."""
    seen, policy = grpo_real_rollout_update(tiny_dir, ["--updates_per_rollout", "2"])
    first, second = seen[:6], seen[6:]
    assert len(seen) == 12 and policy.optimizer_steps == 2
    assert all(m["approx_kl"] < 1e-13 and m["clip_frac"] == 0.0 and m["kl"] == 0.0 for m in first)
    assert all(m["approx_kl"] > 1e-11 and m["kl"] > 0 for m in second), second


# ---------------------------------------------------------------- faithful to the official scripts

def trained_lora(policy):
    """{name: copy} of the trained adapter's weights."""
    return {n: p.detach().clone() for n, p in policy.transformer.named_parameters() if ".default." in n}


def old_lora(policy):
    return {n.replace(".old.", ".default."): p.detach().clone() for n, p in policy.transformer.named_parameters()
            if ".old." in n}


@pytest.mark.parametrize("name", OLD_ADAPTER_OBJECTIVES)
def test_old_ema_follows_the_official_schedule_of_optimizer_steps(tiny_dir, name):
    """3 rollout steps x 2 updates. The old adapter equals an independent re-run of the official
    schedule on the trained weights recorded after each optimizer step: DGPO (ema_ref.step after
    every optimizer step, decay of the steps before it), NFT and AWM (once per rollout batch, decay
    of all optimizer steps so far). The old code stepped once per rollout with the rollout index."""
    spec = "1,0.2,0.7"  # flat for the first optimizer step, then 0.2 per step up to 0.7
    objective, policy, cache = objective_worker.setup(name, tiny_dir, extra=[f"--{name}_old_ema", spec])
    after_each_step = []
    real_step = policy.optimizer_step

    def recording_step(*args, **kwargs):
        stepped = real_step(*args, **kwargs)
        if stepped:
            after_each_step.append(trained_lora(policy))
        return stepped

    policy.optimizer_step = recording_step
    expected = trained_lora(policy)  # the old adapter starts as a copy of the trained one

    def official_decay(global_step):  # the official schedules, written out (start 1, rate 0.2, max 0.7)
        return 0.0 if global_step < 1 else min(0.2 * (global_step - 1), 0.7)

    def ema(decay, weights):
        for key in expected:
            expected[key] = expected[key] * decay + weights[key] * (1 - decay)

    for step in range(3):
        first = len(after_each_step)
        metrics, _ = objective.update(policy, objective_worker.rollouts_for(step, 0, 1), cache, step)
        assert len(after_each_step) == first + 2
        if name == "dgpo":
            for k in (first, first + 1):
                ema(official_decay(k), after_each_step[k])
        else:
            ema(official_decay(len(after_each_step)), after_each_step[-1])
        assert metrics["update/optimizer_steps"] == 2 * (step + 1)
    old = old_lora(policy)
    assert old.keys() == expected.keys()
    assert max((old[k] - expected[k]).abs().max().item() for k in old) <= 1e-6
    assert policy.optimizer_steps == 6


def test_awm_ratio_is_to_the_rollout_weights_not_the_ema(tiny_dir):
    """Step 1 (the old EMA has moved): at the first update the ratio is exactly 1 (fp32); at the
    second, the denominator is the likelihood under the weights that were trained when the rollouts
    were made (recomputed here from a copy), not under the old adapter."""
    import group_losses

    objective, policy, cache = objective_worker.setup("awm", tiny_dir, extra=["--train_timesteps", "1"])
    objective.update(policy, objective_worker.rollouts_for(0, 0, 1), cache, 0)
    at_rollout = trained_lora(policy)
    seen, velocities = [], []
    real_loss, real_velocity = group_losses.awm_loss, policy.velocity

    def spy_loss(model_pred, old_pred, target, sigmas, advantages, **kwargs):
        value, metrics = real_loss(model_pred, old_pred, target, sigmas, advantages, **kwargs)
        seen.append((target, sigmas, kwargs["rollout_logp"], metrics["ratio_mean"], old_pred))
        return value, metrics

    def spy_velocity(*args):
        if torch.is_grad_enabled():
            velocities.append(args)
        return real_velocity(*args)

    group_losses.awm_loss, policy.velocity = spy_loss, spy_velocity
    try:
        metrics, _ = objective.update(policy, objective_worker.rollouts_for(1, 0, 1), cache, 1)
    finally:
        group_losses.awm_loss = real_loss
        del policy.velocity
    assert len(seen) == 4 and len(velocities) == 4  # 4 groups, 2 per optimizer step (update_split disjoint)
    assert all(ratio == 1.0 for *_, ratio, _ in seen[:2])  # first optimizer step: exactly 1
    assert any(ratio != 1.0 for *_, ratio, _ in seen[2:])
    named = dict(policy.transformer.named_parameters())
    with torch.no_grad():
        for key, value in at_rollout.items():
            named[key].copy_(value)
        for (target, sigmas, rollout_logp, _, old_pred), args in zip(seen[2:], velocities[2:]):
            expected = objective.likelihood(policy.velocity(*args), target, sigmas)
            assert torch.allclose(rollout_logp, expected, rtol=0, atol=1e-6)
            assert not torch.allclose(rollout_logp, objective.likelihood(old_pred, target, sigmas), atol=1e-6)


def test_dgpo_samples_with_the_ema_after_switch_ema_ref_optimizer_steps():
    import objectives
    from run_config import parse_config

    def build(*argv):
        return objectives.build(parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, list(argv)))

    assert train_online_dpo.Config.dgpo_switch_ema_ref == 200  # official config/dgpo.py switch_ema_ref
    for clip in ("0", "0.01"):  # official: unconditional; the clip only adds the old forward to the loss
        dgpo = build("--objective", "dgpo", "--dgpo_clip_range", clip)
        assert dgpo.uses_old_adapter and dgpo.needs_old_prediction == (clip != "0")
        assert not dgpo.samples_with_old(200) and dgpo.samples_with_old(201)  # official: global_step > switch_ema_ref
    assert build("--objective", "dgpo", "--dgpo_switch_ema_ref", "3").samples_with_old(4)
    assert build("--objective", "nft").samples_with_old(0) and not build("--objective", "awm").samples_with_old(10 ** 6)


def test_tied_groups_can_be_dropped(tiny_dir, tmp_path):
    logged = objective_worker.run("dgpo", tiny_dir, str(tmp_path), extra=["--drop_tied_groups"])
    assert logged[0]["adv/tied_groups"] == 1 and logged[0]["adv/tied_groups_trained"] == 0
    assert logged[0]["adv/zero_variance_groups_dropped"] == 1 and logged[0]["adv/samples_kept"] == 12


def test_sampler_sigmas_are_the_pipelines_and_each_objective_draws_its_official_timesteps(tiny_dir):
    """qwen_image_rollout.sampler_sigmas equals the schedule the pipeline itself ran; NFT trains each sample
    on int(0.99 n) of the sampler's sigmas in one optimizer step (a random order per sample, official
    train_nft_sd3.py); AWM on one index per stratum of 1 .. int(0.9 n) per group, all strata in one
    optimizer step (official `discrete_wo_init`, train_timesteps strata)."""
    import objectives
    import qwen_image as qi
    import qwen_image_rollout as qir

    objective, policy, cache = objective_worker.setup("nft", tiny_dir, extra=["--num_inference_steps", "6"])
    settings = qir.RolloutSettings(height=64, width=64, num_inference_steps=6, true_cfg_scale=1.0, negative_prompt=" ",
                                  chunk_size=1)
    schedule = policy.sampler_sigmas()
    ran = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    qir.rollout(ran, qi.PromptCache(ran, 64), ["a cat"], [0], settings, decode=False)
    assert torch.allclose(schedule, ran.scheduler.timesteps.float() / 1000, atol=1e-7) and len(schedule) == 6
    assert len(set(schedule.tolist())) == 6 and schedule[0] == 1.0

    rollouts = objective_worker.rollouts_for(0, 0, 1)
    groups = [list(range(g * 4, g * 4 + 4)) for g in range(4)]
    assert objective.timesteps == int(6 * 0.99) == 5  # official num_train_timesteps
    draws = objective._draws(policy, rollouts, groups, 0, (16, 64), [0])[0]
    sigmas = torch.stack([s for _, s in draws])  # [timesteps, rows]
    assert sigmas.shape == (5, 16) and all(any(torch.isclose(v, schedule).tolist()) for v in sigmas.flatten())
    assert all(len(set(sigmas[:, row].tolist())) == 5 for row in range(16))  # no sigma twice for a row
    assert len(set(sigmas[0, :4].tolist())) > 1  # drawn per sample
    noise = draws[0][0]
    assert not torch.equal(noise[0], noise[1]) and not torch.equal(noise, draws[1][0])  # per sample and timestep

    awm = objectives.AWM(objective.config)
    awm.sigma_scheme, awm.timesteps = "sampler_stratified", 2
    sigmas = torch.stack([s for _, s in awm._draws(policy, rollouts, groups, 0, (16, 64), [0])[0]])
    index = [[int(torch.isclose(schedule, v).nonzero()[0]) for v in row] for row in sigmas]
    for g in range(4):
        rows = range(g * 4, g * 4 + 4)
        assert len({index[k][r] for k in range(2) for r in rows}) == 2  # shared in the group, one per stratum
        assert [index[k][g * 4] for k in range(2)] in ([1, 3], [1, 4], [2, 3], [2, 4])  # strata [1,3) and [3,5)
    # the official strata for its OCR recipe: 14 steps, fraction 0.9, 6 timesteps -> boundaries 1,2,4,6,8,10,12
    assert objectives.stratified_sampler_indices(14, 6, 0.9, torch.zeros(6)).tolist() == [1, 2, 4, 6, 8, 10]
    assert objectives.stratified_sampler_indices(14, 6, 0.9, torch.full((6,), 0.999)).tolist() == [1, 3, 5, 7, 9, 11]
    assert objectives.AWM(objective.config).timesteps == 6  # official train.train_timesteps


@pytest.mark.parametrize("split", ["disjoint", "all"])
def test_dgpo_trains_its_official_timesteps_shared_by_the_batch(tiny_dir, split):
    """Official DGPO (scripts/train_sd3_dgpo.py, config/dgpo.py OCR: 10 steps, trunc_steps 6,
    num_train_timesteps 4): `random.sample(range(trunc_steps + 1), 4)` once per rollout batch,
    broadcast, the same for every sample and every optimizer step of the batch. Written out here:
    4 distinct indices of 0..6 of the sampler's own sigmas, shared by all groups; with update_split
    disjoint the same for both optimizer steps (each a part of the batch), with all drawn per update;
    deterministic per (seed, step), different across steps; over many steps every index 0..6 comes up."""
    objective, policy, _ = objective_worker.setup("dgpo", tiny_dir, extra=["--num_inference_steps", "10",
                                                                          "--update_split", split])
    trunc_steps, num_train_timesteps = 6, 4
    assert objective.sigma_scheme == "sampler_first" and objective.timesteps == num_train_timesteps
    schedule = policy.sampler_sigmas()
    rollouts = objective_worker.rollouts_for(0, 0, 1)
    groups = [list(range(g * 4, g * 4 + 4)) for g in range(4)]

    def drawn(step, update):
        draws = objective._draws(policy, rollouts, groups, step, (16, 64), [update])[update]
        out = []
        for noise, sigmas in draws:
            assert torch.equal(sigmas, sigmas[:1].expand(16))  # shared by every sample of the batch
            assert all(torch.equal(noise[r], noise[g[0]]) for g in groups for r in g)  # official use_shared_noise
            out.append(int(torch.isclose(schedule, sigmas[0]).nonzero()[0]))
        return out

    seen = set()
    for step in range(30):
        first = drawn(step, 0)
        assert len(set(first)) == num_train_timesteps and set(first) <= set(range(trunc_steps + 1))
        assert first == drawn(step, 0)  # reproducible
        assert (first == drawn(step, 1)) == (split == "disjoint") or split == "all" and set(first) == set(drawn(step, 1))
        seen |= set(first)
    assert seen == set(range(trunc_steps + 1))


def test_eval_with_ema_keeps_the_official_ema_and_exports_it(tiny_dir, tmp_path):
    """A third adapter follows the official EMAModuleWrapper (decay min((1+k)/(10+k), 0.9) after
    optimizer step k, k counted after the step); the export holds it, not the trained weights."""
    from safetensors.torch import load_file

    objective, policy, cache = objective_worker.setup("nft", tiny_dir, extra=["--eval_with_ema"])
    expected = trained_lora(policy)
    real_step = policy.optimizer_step

    def recording_step(*args, **kwargs):
        stepped = real_step(*args, **kwargs)
        if stepped:
            k = policy.optimizer_steps
            decay = min((1 + k) / (10 + k), 0.9)
            for key, value in trained_lora(policy).items():
                expected[key] = expected[key] * decay + value * (1 - decay)
        return stepped

    policy.optimizer_step = recording_step
    for step in range(2):
        objective.update(policy, objective_worker.rollouts_for(step, 0, 1), cache, step)
    ema = {n.replace(".ema.", ".default."): p.detach() for n, p in policy.transformer.named_parameters() if ".ema." in n}
    assert ema.keys() == expected.keys()
    assert max((ema[k] - expected[k]).abs().max().item() for k in ema) <= 1e-6
    trained = trained_lora(policy)
    assert max((ema[k] - trained[k]).abs().max().item() for k in ema) > 1e-5  # a real EMA, not a copy
    exported = load_file(os.path.join(policy.save_final(str(tmp_path)), "pytorch_lora_weights.safetensors"))
    for name, value in ema.items():
        key = "transformer." + name.replace(".default.", ".")
        assert torch.equal(exported[key], value.cpu()), key
    import model_card
    assert "EMA of the trained LoRA" in model_card.exported_weights_line({"eval_with_ema": True, "eval_ema_decay": 0.9})
    assert "no EMA" in model_card.exported_weights_line({})


def official_advantages(rewards, k: int = 4):
    """The official advantages written out (flow_grpo/stat_tracking.py with global_std): (r - the
    group's mean) / (std of every reward + 1e-4); a group whose rewards are all equal gets exactly 0."""
    scale = rewards.std(unbiased=False) + 1e-4
    means = rewards.reshape(-1, k).mean(dim=1).repeat_interleave(k)
    return torch.where(rewards.reshape(-1, k).std(dim=1).repeat_interleave(k) == 0, torch.zeros_like(rewards),
                       (rewards - means) / scale)


def count_grpo_uses(tiny_dir, extra):
    """-> ({row: how often its first trained step entered the loss}, {row: the optimizer steps it was in},
    the step's metrics) of grpo's first update on objective_worker's fixed rollouts."""
    import flow_grpo

    objective, policy, cache = objective_worker.setup("grpo", tiny_dir, extra=extra)
    trajectory = objective_worker.grpo_trajectory(policy, cache, 0)
    rollouts = objective_worker.rollouts_for(0, 0, 1, trajectory)
    row_of = {float(v): row for row, v in enumerate(trajectory["log_probs"][:, 0])}
    uses, steps, real = {}, {}, flow_grpo.grpo_loss

    def spy(log_prob, old_log_prob, *args, **kwargs):
        for value in old_log_prob.tolist():
            if value in row_of:  # trained step 0 (step 1's log-probs are other numbers)
                uses[row_of[value]] = uses.get(row_of[value], 0) + 1
                steps.setdefault(row_of[value], set()).add(policy.optimizer_steps)
        return real(log_prob, old_log_prob, *args, **kwargs)

    flow_grpo.grpo_loss = spy
    try:
        metrics, _ = objective.update(policy, rollouts, cache, 0)
    finally:
        flow_grpo.grpo_loss = real
    return uses, steps, metrics, rollouts


@pytest.mark.parametrize("updates", [2, 5])
def test_grpo_trains_the_official_samples_once_each(tiny_dir, updates):
    """Official train_sd3.py, written out: the samples with advantage exactly 0 are dropped; when the
    kept count is not a multiple of the optimizer steps' parts, just enough zero-advantage samples are
    put back; the rest is cut into equal parts, one per optimizer step: each trained sample is used
    exactly once. 12 kept of 16 (group 1 ties): 2 steps of 6, or 5 steps of 3 with 3 tied samples back."""
    uses, steps, metrics, rollouts = count_grpo_uses(tiny_dir, ["--updates_per_rollout", str(updates)])
    advantages = official_advantages(rollouts.rewards)
    nonzero = [row for row in range(16) if advantages[row] != 0]
    padding = (updates - len(nonzero) % updates) % updates
    assert len(nonzero) == 12 and padding == {2: 0, 5: 3}[updates]
    assert all(uses.get(row) == 1 for row in nonzero)
    assert sorted(uses.get(row, 0) for row in range(16) if row not in nonzero) == [0] * (4 - padding) + [1] * padding
    per_step = {}
    for row in uses:
        assert len(steps[row]) == 1
        per_step[min(steps[row])] = per_step.get(min(steps[row]), 0) + 1
    assert sorted(per_step.values()) == [(12 + padding) // updates] * updates
    assert metrics["adv/zero_advantage_samples_padded"] == padding and metrics["grpo/max_uses_per_sample"] == 1


def test_grpo_keeps_the_old_update_as_options(tiny_dir):
    """update_split all + grpo_keep_zero_advantage: every sample, the tied ones too, in each update."""
    uses, steps, metrics, _ = count_grpo_uses(tiny_dir, ["--update_split", "all", "--grpo_keep_zero_advantage"])
    assert uses == {row: 2 for row in range(16)} and all(len(s) == 2 for s in steps.values())
    assert metrics["adv/samples_kept"] == 16 and metrics["grpo/max_uses_per_sample"] == 2


@pytest.mark.parametrize("split", ["disjoint", "all"])
def test_group_objectives_use_each_sample_as_the_official_scripts(tiny_dir, split):
    """Official NFT / AWM / DGPO scripts, written out: one inner epoch, the rollout batch shuffled and
    cut into equal parts, `gradient_accumulation_steps` parts per optimizer step, and every trained
    timestep of a sample accumulated in its optimizer step: each sample (the tied group too) enters
    the loss `timesteps` times, all in one optimizer step. update_split all (the old behaviour):
    every sample in every update."""
    objective, policy, cache = objective_worker.setup("nft", tiny_dir, extra=["--update_split", split])
    rollouts = objective_worker.rollouts_for(0, 0, 1)
    row_of = {float(rollouts.latents[row, 0, 0]): row for row in range(16)}
    uses, steps, real = {}, {}, policy.velocity

    def spy(x0, *args):
        for value in x0[:, 0, 0].tolist():
            uses[row_of[value]] = uses.get(row_of[value], 0) + 1
            steps.setdefault(row_of[value], set()).add(policy.optimizer_steps)
        return real(x0, *args)

    policy.velocity = spy
    try:
        objective.update(policy, rollouts, cache, 0)
    finally:
        del policy.velocity
    T, updates = objective.timesteps, 2
    assert T == int(4 * 0.99) == 3  # official num_train_timesteps at 4 sampling steps
    if split == "disjoint":
        assert uses == {row: T for row in range(16)} and all(len(s) == 1 for s in steps.values())
        per_step = [sum(1 for s in steps.values() if step in s) for step in range(updates)]
        assert per_step == [8, 8]  # 2 whole groups per optimizer step
        groups_of = [{row // 4 for row, s in steps.items() if step in s} for step in range(updates)]
        assert all(len(g) == 2 for g in groups_of)  # whole groups in a part
    else:
        assert uses == {row: T * updates for row in range(16)} and all(len(s) == 2 for s in steps.values())


def test_diffusers_dpm_solver_cannot_run_inside_qwen_image_pipeline():
    """Why rollouts stay Euler (docs/objectives.md): QwenImagePipeline passes `sigmas=` (and `mu=`) to
    set_timesteps (retrieve_timesteps), which diffusers' flow-capable DPMSolverMultistepScheduler does
    not take, nor does SASolverScheduler; if a release adds it, offer it as a rollout sampler."""
    import inspect

    from diffusers import DPMSolverMultistepScheduler, SASolverScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import retrieve_timesteps

    assert "sigmas=sigmas" in inspect.getsource(inspect.getmodule(retrieve_timesteps).QwenImagePipeline.__call__)
    for scheduler in (DPMSolverMultistepScheduler, SASolverScheduler):
        assert "sigmas" not in inspect.signature(scheduler.set_timesteps).parameters
    solver = DPMSolverMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    with pytest.raises(ValueError, match="sigmas"):
        retrieve_timesteps(solver, 4, "cpu", sigmas=[1.0, 0.75, 0.5, 0.25])
