import numpy as np
import torch

import qwen_image as qi
import qwen_image_rollout as qir
from dpo_loss import noisy_latents, velocity_target

H = W = 64
PROMPTS = ['A sign that says "Open" on a wall', 'A red apple, photo', 'A cup with the word "Morning"']


def settings(**kw):
    return qir.RolloutSettings(**{**dict(height=H, width=W, num_inference_steps=4, chunk_size=8), **kw})


def test_tiny_build_is_deterministic_and_uses_real_classes(tiny_pipe):
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration

    a, b = qi.build_tiny_pipeline(seed=3), qi.build_tiny_pipeline(seed=3)
    c = qi.build_tiny_pipeline(seed=4)
    for name in ("transformer", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(a.transformer.state_dict()[k], c.transformer.state_dict()[k])
                   for k in a.transformer.state_dict() if "weight" in k)
    assert isinstance(tiny_pipe.transformer, QwenImageTransformer2DModel)
    assert isinstance(tiny_pipe.vae, AutoencoderKLQwenImage)
    assert isinstance(tiny_pipe.text_encoder, Qwen2_5_VLForConditionalGeneration)
    # the pipeline drops the first 34 tokens of its template: they must be the system prompt exactly
    template = tiny_pipe.prompt_template_encode
    prefix = tiny_pipe.tokenizer(template.split("{}")[0])["input_ids"]
    assert len(prefix) == tiny_pipe.prompt_template_encode_start_idx == 34
    full = tiny_pipe.tokenizer(template.format("a cat"))["input_ids"]
    assert tiny_pipe.tokenizer.decode(full[34:]).startswith("a cat")


def test_rollout_latents_decode_to_the_pipelines_images(tiny_pipe):
    cache = qi.PromptCache(tiny_pipe, max_sequence_length=256)
    prompts, seeds = [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2, [0, 1, 2, 3]
    latents, images = qir.rollout(tiny_pipe, cache, prompts, seeds, settings(chunk_size=4))
    assert latents.shape == (4, (H // 16) * (W // 16), 64)
    # the pipeline's own decode, given the same conditioning: bit-identical images
    embeds, mask = cache(prompts)
    refs = tiny_pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, height=H, width=W, num_inference_steps=4,
                     true_cfg_scale=1.0, generator=[torch.Generator().manual_seed(s) for s in seeds]).images
    for i in range(4):
        assert np.array_equal(np.asarray(refs[i]), np.asarray(images[i]))
    assert len({np.asarray(im).tobytes() for im in images}) == 4
    # the pipeline from raw prompts encodes them in another batch shape: equal up to BLAS rounding
    raw = tiny_pipe(prompt=prompts, height=H, width=W, num_inference_steps=4, true_cfg_scale=1.0,
                    generator=[torch.Generator().manual_seed(s) for s in seeds], max_sequence_length=256,
                    output_type="latent").images
    torch.testing.assert_close(latents, raw, atol=1e-5, rtol=0)


def test_rollout_with_true_cfg_matches_pipeline(tiny_pipe):
    cache = qi.PromptCache(tiny_pipe, max_sequence_length=256)
    s = settings(true_cfg_scale=4.0, negative_prompt="blurry", chunk_size=2)
    latents, _ = qir.rollout(tiny_pipe, cache, [PROMPTS[2]] * 2, [5, 6], s, decode=False)
    ref = tiny_pipe(prompt=[PROMPTS[2]] * 2, negative_prompt=["blurry"] * 2, true_cfg_scale=4.0, height=H, width=W,
                    num_inference_steps=4, generator=[torch.Generator().manual_seed(k) for k in (5, 6)],
                    output_type="latent").images
    torch.testing.assert_close(latents, ref.float(), atol=1e-5, rtol=0)


def test_sample_is_bit_identical_alone_and_in_a_batch_of_8(tiny_pipe):
    cache = qi.PromptCache(tiny_pipe, max_sequence_length=256)
    batch, _ = qir.rollout(tiny_pipe, cache, [PROMPTS[0]] * 8, list(range(8)), settings(), decode=False)
    for k in (0, 5):
        alone, _ = qir.rollout(tiny_pipe, cache, [PROMPTS[0]], [k], settings(), decode=False)
        assert torch.equal(alone[0], batch[k])
    # and at another position, next to other seeds
    moved, _ = qir.rollout(tiny_pipe, cache, [PROMPTS[0]] * 8, [5] + list(range(100, 107)), settings(), decode=False)
    assert torch.equal(moved[0], batch[5])
    assert not torch.equal(batch[0], batch[1])


def test_text_encoder_runs_once_per_distinct_prompt(tiny_pipe):
    rows = []
    handle = tiny_pipe.text_encoder.register_forward_hook(
        lambda m, args, kwargs, out: rows.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    cache = qi.PromptCache(tiny_pipe, max_sequence_length=256)
    s = settings(chunk_size=4)
    for _ in range(3):
        qir.rollout(tiny_pipe, cache, [p for p in PROMPTS[:2] for _ in range(4)], list(range(8)), s, decode=False)
    handle.remove()
    assert len(cache.embeds) == 2
    assert sum(rows) == 2 and cache.encoder_calls == 1
    # the cached embeddings equal the pipeline's own encoding, and the text encoder can leave
    embeds, mask = tiny_pipe.encode_prompt(PROMPTS[:2], device="cpu", max_sequence_length=256)
    ours, our_mask = cache(PROMPTS[:2])
    torch.testing.assert_close(ours, embeds, atol=1e-6, rtol=0)
    assert torch.equal(our_mask, mask)
    cache.offload_text_encoder("meta")
    again, _ = cache(PROMPTS[:2])
    assert torch.equal(again, ours)


def test_training_forward_matches_the_pipelines_own_call(tiny_pipe):
    captured = []

    def hook(module, args, kwargs, output):
        captured.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()} | {"out": output[0].clone()})

    handle = tiny_pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    prompts = [PROMPTS[0], PROMPTS[1]]  # different lengths: a real padding mask
    tiny_pipe(prompt=prompts, height=H, width=W, num_inference_steps=3, true_cfg_scale=1.0,
              generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="latent",
              max_sequence_length=256)
    handle.remove()
    cache = qi.PromptCache(tiny_pipe, max_sequence_length=256)
    embeds, mask = cache(prompts)
    tiny_pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 3, 3), mu=qi_mu(tiny_pipe))
    for step, call in enumerate(captured):
        sigma = tiny_pipe.scheduler.sigmas[step]
        assert torch.allclose(call["timestep"], sigma.expand(2), atol=1e-6)  # timestep is sigma, not 1000*sigma
        pred = qi.predict_velocity(tiny_pipe.transformer, call["hidden_states"], sigma.expand(2), embeds, mask, H, W)
        torch.testing.assert_close(pred, call["out"], atol=1e-6, rtol=0)
    assert mask is not None and not bool(mask.all())


def qi_mu(pipe):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    c = pipe.scheduler.config
    return calculate_shift((H // 16) * (W // 16), c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift)


def _batch(pipe, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache = qi.PromptCache(pipe, max_sequence_length=256)
    embeds, mask = cache([PROMPTS[i % 3] for i in range(n)])
    x0 = torch.randn(n, (H // 16) * (W // 16), 64, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    sigmas = torch.rand(n, generator=g)
    return x0, noise, sigmas, embeds, mask


def test_reference_equals_base_model_and_lora_grads_survive(tiny_pipe, tiny_dir):
    base = qi.load_pipeline(tiny_dir, dtype=torch.float32).transformer
    t = tiny_pipe.transformer
    params = qi.add_lora(t, rank=4, alpha=8, target_modules=qi.RECIPE_LORA_TARGETS)
    # A and B per target per block, less the last block's 4 text-stream modules that feed nothing
    assert len(params) == 2 * (2 * len(qi.RECIPE_LORA_TARGETS) - 4)
    torch.manual_seed(0)
    for p in params:  # make the policy differ from the base so the check means something
        p.data.normal_(0, 0.05)
    x0, noise, sigmas, embeds, mask = _batch(tiny_pipe)
    xs = noisy_latents(x0, noise, sigmas)
    with torch.no_grad(), qi.lora_disabled(t):
        ref = qi.predict_velocity(t, xs, sigmas, embeds, mask, H, W)
    with torch.no_grad():
        base_pred = qi.predict_velocity(base, xs, sigmas, embeds, mask, H, W)
    assert torch.equal(ref, base_pred)
    pred = qi.predict_velocity(t, xs, sigmas, embeds, mask, H, W)
    assert (pred - ref).abs().max() > 1e-3
    loss = ((pred - velocity_target(x0, noise)) ** 2).mean() - ((ref - velocity_target(x0, noise)) ** 2).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    before = [p.detach().clone() for p in params]
    torch.optim.AdamW(params, lr=1e-2).step()
    assert all(not torch.equal(b, p) for b, p in zip(before, params))
    assert all(not p.requires_grad for n, p in t.named_parameters() if "lora_" not in n)


def test_full_parameter_reference_is_a_frozen_copy(tiny_pipe):
    t = tiny_pipe.transformer
    reference = qi.make_frozen_reference(t)
    x0, noise, sigmas, embeds, mask = _batch(tiny_pipe)
    xs = noisy_latents(x0, noise, sigmas)
    opt = torch.optim.SGD(t.parameters(), lr=1e-1)
    with torch.no_grad():
        ref0 = qi.predict_velocity(reference, xs, sigmas, embeds, mask, H, W)
    qi.predict_velocity(t, xs, sigmas, embeds, mask, H, W).pow(2).mean().backward()
    opt.step()
    with torch.no_grad():
        assert torch.equal(qi.predict_velocity(reference, xs, sigmas, embeds, mask, H, W), ref0)
        assert not torch.allclose(qi.predict_velocity(t, xs, sigmas, embeds, mask, H, W), ref0)
    assert not any(p.requires_grad for p in reference.parameters())


def test_lora_save_and_diffusers_load_reproduce_the_policy(tiny_pipe, tiny_dir, tmp_path):
    t = tiny_pipe.transformer
    params = qi.add_lora(t, rank=4, alpha=8)
    torch.manual_seed(1)
    for p in params:
        p.data.normal_(0, 0.05)
    qi.save_lora(t, str(tmp_path))
    fresh = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    fresh.load_lora_weights(str(tmp_path))
    x0, noise, sigmas, embeds, mask = _batch(tiny_pipe)
    xs = noisy_latents(x0, noise, sigmas)
    with torch.no_grad():
        a = qi.predict_velocity(t, xs, sigmas, embeds, mask, H, W)
        b = qi.predict_velocity(fresh.transformer, xs, sigmas, embeds, mask, H, W)
        with qi.lora_disabled(t):
            base = qi.predict_velocity(t, xs, sigmas, embeds, mask, H, W)
    assert (a - b).abs().max() <= 1e-6
    assert (a - base).abs().max() > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients(tiny_pipe):
    t = tiny_pipe.transformer
    params = qi.add_lora(t, rank=4, alpha=8)
    x0, noise, sigmas, embeds, mask = _batch(tiny_pipe)
    grads = []
    for enabled in (False, True):
        qi.set_gradient_checkpointing(t, enabled)
        t.train()
        for p in params:
            p.grad = None
        qi.predict_velocity(t, noisy_latents(x0, noise, sigmas), sigmas, embeds, mask, H, W).pow(2).mean().backward()
        grads.append([p.grad.clone() for p in params])
    assert t.is_gradient_checkpointing
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_bf16_forward_runs_close_to_fp32(tiny_dir):
    p32 = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    p16 = qi.load_pipeline(tiny_dir, dtype=torch.bfloat16)
    x0, noise, sigmas, embeds, mask = _batch(p32)
    xs = noisy_latents(x0, noise, sigmas)
    with torch.no_grad():
        a = qi.predict_velocity(p32.transformer, xs, sigmas, embeds, mask, H, W)
        b = qi.predict_velocity(p16.transformer, xs, sigmas, embeds, mask, H, W)
    assert b.dtype == torch.bfloat16
    assert (a - b.float()).abs().max() < 0.1 * a.abs().max()


def test_vae_encode_decode_are_inverse_up_to_the_vaes_own_error(tiny_pipe):
    """A random VAE is no autoencoder (measured: its round trip has RMS error 1.06 on unit-RMS
    latents, correlation ~0), so 'close' is measured against the raw VAE's own round trip: our
    normalise / pack / unpack / uint8 steps must add nothing to it (asserted to 1e-3 relative)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, (H // 16) * (W // 16), 64, generator=g)
    images = qi.decode_latents(tiny_pipe, z, H, W)
    z_back = qi.encode_images(tiny_pipe, images, H, W)
    assert z_back.shape == z.shape
    # the same round trip by hand in the raw VAE space, through the pipeline's own (un)packing
    mean, std = qi._latent_stats(tiny_pipe, "cpu", torch.float32)
    raw = tiny_pipe._unpack_latents(z, H, W, 8) * std + mean
    pixels = tiny_pipe.vae.decode(raw, return_dict=False)[0].clamp(-1, 1)
    pixels = (pixels * 127.5 + 127.5).round() / 127.5 - 1  # the uint8 step of PIL images
    raw_back = tiny_pipe.vae.encode(pixels).latent_dist.mode()
    raw_err = ((raw_back - raw) / std).pow(2).mean().sqrt()
    our_err = (z_back - z).pow(2).mean().sqrt()
    torch.testing.assert_close(our_err, raw_err, rtol=1e-3, atol=1e-5)
    # encode is deterministic and resizes/centre-crops other sizes to the training resolution

    big = images[0].resize((96, 64))
    assert qi.encode_images(tiny_pipe, [big], H, W).shape == (1, 16, 64)
    assert torch.equal(qi.encode_images(tiny_pipe, images, H, W), z_back)


def _capture_pipeline_steps(pipe, cache, prompts, steps, **kw):
    """Runs the pipeline with the cache's embeddings (as `rollout` does) and records, per step, the
    conditional transformer call's inputs and the prediction the scheduler stepped with."""
    calls, stepped = [], []

    def pre_hook(module, args, kwargs):
        calls.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in kwargs.items()})

    handle = pipe.transformer.register_forward_pre_hook(pre_hook, with_kwargs=True)
    scheduler_step = pipe.scheduler.step
    pipe.scheduler.step = lambda output, *a, **k: (stepped.append(output.clone()), scheduler_step(output, *a, **k))[1]
    dtype = pipe.transformer.dtype
    embeds, mask = cache(prompts, dtype=dtype)
    extra = {}
    if kw.get("true_cfg_scale", 1.0) > 1:
        neg, neg_mask = cache([kw.pop("negative_prompt")] * len(prompts), dtype=dtype)
        extra = dict(negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask)
    try:
        pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, height=H, width=W, num_inference_steps=steps,
             generator=[torch.Generator().manual_seed(s) for s in range(len(prompts))], output_type="latent",
             **extra, **kw)
    finally:
        handle.remove()
        pipe.scheduler.step = scheduler_step
    cond_calls = calls[::2] if extra else calls
    return cond_calls, stepped, pipe.scheduler.sigmas


def test_bf16_training_forward_equals_the_pipelines_transformer_call_bit_for_bit(tiny_dir):
    """The timestep is rounded as the sampler rounds it: bf16(1000 sigma) / 1000, not bf16(sigma)."""
    pipe = qi.load_pipeline(tiny_dir, dtype=torch.bfloat16)
    cache = qi.PromptCache(pipe, max_sequence_length=256)
    prompts = [PROMPTS[0], PROMPTS[1]]
    calls, stepped, sigmas = _capture_pipeline_steps(pipe, cache, prompts, 8, true_cfg_scale=1.0)
    embeds, mask = cache(prompts, dtype=torch.bfloat16)
    rounded_differently = 0
    with torch.no_grad():
        for step, call in enumerate(calls):
            sigma = sigmas[step].expand(2)
            rounded_differently += int(not torch.equal(sigma.to(torch.bfloat16), call["timestep"]))
            pred = qi.predict_velocity(pipe.transformer, call["hidden_states"], sigma, embeds, mask, H, W)
            assert pred.dtype == torch.bfloat16 and torch.equal(pred, stepped[step]), step
    assert rounded_differently > 0  # the test covers sigmas where the two roundings differ


def test_training_forward_with_true_cfg_equals_the_pipelines_combined_prediction(tiny_pipe):
    cache = qi.PromptCache(tiny_pipe, max_sequence_length=256)
    prompts = [PROMPTS[0], PROMPTS[2]]
    calls, stepped, sigmas = _capture_pipeline_steps(tiny_pipe, cache, prompts, 3, true_cfg_scale=4.0,
                                                     negative_prompt="blurry")
    embeds, mask = cache(prompts)
    neg, neg_mask = cache(["blurry"] * 2)
    with torch.no_grad():
        for step, call in enumerate(calls):
            sigma = sigmas[step].expand(2)
            pred = qi.predict_velocity(tiny_pipe.transformer, call["hidden_states"], sigma, embeds, mask, H, W,
                                       negative_prompt_embeds=neg, negative_prompt_mask=neg_mask, true_cfg_scale=4.0)
            assert torch.equal(pred, stepped[step]), step
            cond = qi.predict_velocity(tiny_pipe.transformer, call["hidden_states"], sigma, embeds, mask, H, W)
            assert (cond - pred).abs().max() > 1e-3  # CFG changes the prediction


def test_prompt_cache_stores_compact_cpu_copies(tiny_pipe):
    cache = qi.PromptCache(tiny_pipe, max_sequence_length=256)
    cache.warm(PROMPTS)
    lengths = set()
    for prompt, e in cache.embeds.items():
        assert e.device.type == "cpu" and e.is_contiguous()
        assert e.untyped_storage().nbytes() == e.numel() * e.element_size(), prompt  # not a view of the padded batch
        lengths.add(e.shape[0])
    assert len(lengths) > 1  # the batch was padded: views would hold the longest length
    embeds, mask = cache(PROMPTS, device="cpu")
    assert embeds.shape[:2] == mask.shape and mask.sum(1).tolist() == [cache.embeds[p].shape[0] for p in PROMPTS]


def test_prompt_cache_encodes_each_prompt_once_across_two_processes(tmp_path):
    """2 CPU processes (gloo): each encodes its share, both end with every embedding, bit-identical."""
    import os
    import subprocess
    import sys

    from conftest import ROOT

    worker = os.path.join(ROOT, "tests", "prompt_cache_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker, str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    encoded = [r["encoded_prompts"] for r in ranks]
    assert sum(encoded) == len(ranks[0]["embeds"]) == 7 and min(encoded) >= 3  # 7 distinct prompts, split
    assert ranks[0]["embeds"].keys() == ranks[1]["embeds"].keys()
    for prompt, e in ranks[0]["embeds"].items():
        assert torch.equal(e, ranks[1]["embeds"][prompt])
