"""Flow-GRPO (flow_grpo.py, qwen_image_rollout.SDERecorder, objectives.GRPO): the SDE step and its transition
log-probability against hand-written formulas, the step's statistics, the loss, the step windows,
and the sampler inside the real QwenImagePipeline (a = 0 reproduces it exactly; the recorded
log-probs are what the training path recomputes)."""

import math

import numpy as np
import pytest
import torch

import flow_grpo
import qwen_image as qi
import qwen_image_rollout as qir

H = W = 64
PROMPTS = ['A sign that says "Open" on a wall', 'A red apple, photo']


def hand_sde(x, v, t, t_next, sigma_max, a):
    """float64 numpy: (mean, std of x_next) by the paper's formula, written independently."""
    x, v = np.asarray(x, np.float64), np.asarray(v, np.float64)
    dt = t_next - t
    denominator = 1 - (sigma_max if t == 1 else t)
    sigma_t = a * math.sqrt(t / denominator)
    mean = x + (v + sigma_t ** 2 / (2 * t) * (x + (1 - t) * v)) * dt
    return mean, sigma_t * math.sqrt(-dt), sigma_t


def test_transition_log_prob_equals_the_gaussian_density_written_by_hand():
    g = torch.Generator().manual_seed(0)
    x, v, z = (torch.randn(3, 5, 8, generator=g) for _ in range(3))
    for t, t_next in ((1.0, 0.8), (0.6, 0.35), (0.05, 0.0)):
        mean, step_std, sigma_t = flow_grpo.sde_step_mean(x, v, t, t_next, 0.8, 0.7)
        ref_mean, ref_std, ref_sigma = hand_sde(x.numpy(), v.numpy(), t, t_next, 0.8, 0.7)
        x_next = torch.from_numpy(ref_mean + 1.5 * ref_std * z.numpy()).float()
        np.testing.assert_allclose(mean.numpy(), ref_mean, rtol=1e-5, atol=1e-5)
        assert step_std.flatten().tolist() == pytest.approx([ref_std] * 3, rel=1e-6)
        assert sigma_t.flatten().tolist() == pytest.approx([ref_sigma] * 3, rel=1e-6)
        log_prob = flow_grpo.transition_log_prob(x_next, mean, step_std)
        density = np.exp(-(x_next.numpy() - ref_mean) ** 2 / (2 * ref_std ** 2)) / (ref_std * math.sqrt(2 * math.pi))
        expected = np.log(density).reshape(3, -1).mean(axis=1)
        np.testing.assert_allclose(log_prob.numpy(), expected, rtol=1e-5, atol=1e-5)
    # t = 1: sigma_t uses the scheduler's second sigma in the denominator (finite), not 1 - t = 0
    assert flow_grpo.sde_sigma(torch.tensor([1.0]), 0.8, 0.7).item() == pytest.approx(0.7 * math.sqrt(1 / 0.2))
    # per-row sigmas broadcast like scalars
    mean_rows, _, _ = flow_grpo.sde_step_mean(x, v, torch.tensor([0.6, 0.6, 1.0]), torch.tensor([0.35, 0.35, 0.8]),
                                              0.8, 0.7)
    assert torch.allclose(mean_rows[:2], flow_grpo.sde_step_mean(x, v, 0.6, 0.35, 0.8, 0.7)[0][:2])
    assert torch.allclose(mean_rows[2], flow_grpo.sde_step_mean(x, v, 1.0, 0.8, 0.8, 0.7)[0][2])


def test_sde_step_statistics_over_many_noises_match_the_formula():
    """x_next = mean + std eps: over 20000 draws the empirical mean and variance of each element
    match the formula's (within 5 standard errors), and the noise is what makes it stochastic."""
    g = torch.Generator().manual_seed(1)
    x, v = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g)
    t, t_next, a = 0.7, 0.55, 0.9
    mean, step_std, _ = flow_grpo.sde_step_mean(x, v, t, t_next, 0.9, a)
    draws = mean + step_std * torch.randn(20000, 6, generator=g)
    ref_mean, ref_std, _ = hand_sde(x.numpy(), v.numpy(), t, t_next, 0.9, a)
    n = draws.shape[0]
    assert np.all(np.abs(draws.double().mean(0).numpy() - ref_mean[0]) < 5 * ref_std / math.sqrt(n))
    var = draws.double().var(0).numpy()
    assert np.all(np.abs(var - ref_std ** 2) < 5 * ref_std ** 2 * math.sqrt(2 / n))
    # the drift is not the Euler step's: the SDE's mean carries the sigma_t^2 / (2t) correction
    assert (mean - (x + v * (t_next - t))).abs().max() > 1e-3


def test_grpo_loss_clips_the_ratio_and_adds_the_official_kl():
    logp = torch.tensor([0.0, 0.5, -0.5, 0.0], requires_grad=True)
    old = torch.zeros(4)
    adv = torch.tensor([1.0, 1.0, -1.0, 9.0])  # the last is clipped to 5
    loss, m = flow_grpo.grpo_loss(logp, old, adv, clip_range=0.2, adv_clip=5.0)
    ratio = logp.detach().exp()
    expected = torch.stack([-1 * ratio[0], -1 * min(ratio[1], torch.tensor(1.2)),
                            torch.maximum(ratio[2], torch.tensor(0.8)), -5 * ratio[3]]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    # clipped rows (ratio above 1 + eps with A > 0, below 1 - eps with A < 0) get no gradient
    assert logp.grad.tolist() == pytest.approx([-0.25, 0.0, 0.0, -1.25])
    assert m["clip_frac"] == 0.5 and m["ratio_mean"] == pytest.approx(ratio.mean().item())
    mean, ref = torch.ones(2, 3, 4), torch.zeros(2, 3, 4)
    sigma_t = torch.tensor([0.5, 1.0]).view(2, 1, 1)
    total, m = flow_grpo.grpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), mean=mean, ref_mean=ref,
                                   sigma_t=sigma_t, kl_weight=0.04)
    assert m["kl"] == pytest.approx((1 / (2 * 0.25) + 1 / 2) / 2) and total.item() == pytest.approx(0.04 * m["kl"])
    with pytest.raises(ValueError, match="needs mean"):
        flow_grpo.grpo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), kl_weight=0.1)


def test_sde_steps_windows_and_timestep_fraction():
    assert flow_grpo.sde_steps(10) == (list(range(10)), list(range(9)))  # 0.99: the last step untrained
    assert flow_grpo.sde_steps(10, "", 1.0) == (list(range(10)), list(range(10)))
    assert flow_grpo.sde_steps(8, "2,3", 1.0) == ([2, 3, 4], [2, 3, 4])
    assert flow_grpo.sde_steps(8, "2,3", 0.7) == ([2, 3, 4], [2, 3])
    for window in ("7,2", "a,b", "1", "-1,2", "0,0"):
        with pytest.raises(ValueError, match="window"):
            flow_grpo.sde_steps(8, window)
    with pytest.raises(ValueError, match="trains no step"):
        flow_grpo.sde_steps(1, "", 0.99)


def test_fast_window_start_is_drawn_in_the_first_half_per_seed():
    """Official Flow-GRPO-Fast (sd3_pipeline_with_logprob_fast.py with config/grpo.py SD3.5 fast
    configs): start = random.randint(0, num_steps // 2 - window_size), both ends included, so with
    10 steps and a window of 3 every start of 0, 1, 2 and no other; here drawn from a seed (the
    run seed and step through prompt_data.derived_seed), the same for the same seed."""
    import collections

    official = set(range(0, 10 // 2 - 3 + 1))
    starts = collections.Counter(flow_grpo.window_start(10, 3, seed) for seed in range(600))
    assert set(starts) == official and min(starts.values()) > 150  # ~200 each: uniform
    assert [flow_grpo.window_start(10, 3, 7)] * 3 == [flow_grpo.window_start(10, 3, 7) for _ in range(3)]
    assert flow_grpo.resolve_window("random:3", 10, 7) == f"{flow_grpo.window_start(10, 3, 7)},3"
    assert flow_grpo.resolve_window("2,3", 10, 7) == "2,3" and flow_grpo.resolve_window("", 10, 7) == ""
    assert {flow_grpo.window_start(4, 2, seed) for seed in range(50)} == {0}  # 4 steps: only 0..1 fit
    for window in ("random:6", "random:0", "random:x"):
        with pytest.raises(ValueError, match="window"):
            flow_grpo.resolve_window(window, 10, 0)


def test_grpo_recorder_draws_its_window_per_step_from_the_run_seed():
    import objectives
    import train_online_dpo
    from prompt_data import derived_seed
    from run_config import parse_config

    config = parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, [
        "--objective", "grpo", "--num_inference_steps", "10", "--grpo_sde_window", "random:3",
        "--grpo_timestep_fraction", "1", "--seed", "5"])
    grpo = objectives.build(config)
    windows = {}
    for step in range(40):
        recorder = grpo.recorder(step)
        start = flow_grpo.window_start(10, 3, derived_seed("grpo_sde_window", 5, step))
        assert sorted(recorder.sde_steps) == recorder.trained_steps == [start, start + 1, start + 2]
        assert grpo.recorder(step).trained_steps == recorder.trained_steps  # reproducible (and on resume)
        windows[start] = windows.get(start, 0) + 1
    assert set(windows) == {0, 1, 2}


def sde_rollout(pipe, prompts, seeds, noise_level, steps=4, window="", fraction=1.0, chunk_size=4, **kw):
    cache = qi.PromptCache(pipe, max_sequence_length=256)
    sde, trained = flow_grpo.sde_steps(steps, window, fraction)
    recorder = qir.SDERecorder(noise_level, sde, trained)
    settings = qir.RolloutSettings(height=H, width=W, num_inference_steps=steps, chunk_size=chunk_size, **kw)
    latents, _ = qir.rollout(pipe, cache, prompts, seeds, settings, decode=False, scheduler_step=recorder.chunk_step)
    return latents, recorder.result(), cache


@pytest.mark.parametrize("cfg", [1.0, 4.0])
def test_sde_sampler_with_zero_noise_is_the_pipeline_exactly(tiny_pipe, cfg):
    """a = 0 through the SDE formula at every step: the pipeline's own latents, bit for bit (fp32),
    with and without true CFG; a > 0 changes them, per image by its seed alone."""
    prompts, seeds = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, [0, 1, 2, 3]
    kw = dict(true_cfg_scale=cfg, negative_prompt="blurry")
    cache = qi.PromptCache(tiny_pipe, max_sequence_length=256)
    settings = qir.RolloutSettings(height=H, width=W, num_inference_steps=4, chunk_size=4, **kw)
    plain, _ = qir.rollout(tiny_pipe, cache, prompts, seeds, settings, decode=False)
    zero, trajectory, _ = sde_rollout(tiny_pipe, prompts, seeds, 0.0, **kw)
    assert torch.equal(plain, zero)
    assert trajectory["before"].shape == (4, 4, 16, 64) and torch.equal(trajectory["after"][:, -1], zero)
    assert torch.equal(trajectory["after"][:, :-1], trajectory["before"][:, 1:])  # consecutive states
    noisy, _, _ = sde_rollout(tiny_pipe, prompts, seeds, 0.7, **kw)
    assert (noisy - plain).abs().max() > 1e-2
    alone, _, _ = sde_rollout(tiny_pipe, prompts[2:3], seeds[2:3], 0.7, chunk_size=4, **kw)
    torch.testing.assert_close(alone[0], noisy[2], atol=1e-5, rtol=0)  # its own seed's noise, wherever it sits


def test_recorded_log_probs_are_what_the_training_forward_recomputes(tiny_pipe):
    """The pipeline's timesteps (dynamic shift), the window's ODE steps and the recorded transitions:
    recomputing each trained step from the recorded x_j with the training forward (predict_velocity)
    gives the recorded log-prob (ratio 1), and x_{j+1} deviates from the step mean by the step's std."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    prompts, seeds = [PROMPTS[0]] * 4, [5, 6, 7, 8]
    latents, trajectory, cache = sde_rollout(tiny_pipe, prompts, seeds, 0.7, steps=6, window="1,3", fraction=1.0)
    c = tiny_pipe.scheduler.config
    mu = calculate_shift((H // 16) * (W // 16), c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)
    tiny_pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 6, 6), mu=mu)
    sigmas = tiny_pipe.scheduler.sigmas
    assert trajectory["steps"] == [1, 2, 3] and trajectory["sigmas"].tolist() == sigmas[1:4].tolist()
    assert trajectory["sigma_max"] == sigmas[1].item()
    embeds, mask = cache(prompts)
    z = []
    for j in range(3):
        x = trajectory["before"][:, j]
        with torch.no_grad():
            v = qi.predict_velocity(tiny_pipe.transformer, x, trajectory["sigmas"][j].expand(4), embeds, mask, H, W)
        mean, step_std, _ = flow_grpo.sde_step_mean(x, v, trajectory["sigmas"][j], trajectory["sigmas_next"][j],
                                                    trajectory["sigma_max"], 0.7)
        log_prob = flow_grpo.transition_log_prob(trajectory["after"][:, j], mean, step_std)
        torch.testing.assert_close(log_prob, trajectory["log_probs"][:, j], atol=2e-6, rtol=0)
        z.append(((trajectory["after"][:, j] - mean) / step_std).flatten())
    z = torch.cat(z)
    assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05  # standard normal noise
    # after the window the ODE runs on: the last steps are deterministic Euler steps from x_4
    assert not torch.equal(trajectory["after"][:, -1], latents)
