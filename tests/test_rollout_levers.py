"""Cheaper rollouts: diffusers' step caches during the training rollout only (qwen_image_rollout.rollout_cache),
the block forwards they really run (qwen_image_rollout.counting_block_forwards) and the FLOPs counted from
them, and the evaluation's independence from every rollout-only lever."""

import json
import os

import pytest
import torch

import flop_formula
import perf
import qwen_image as qi
import qwen_image_rollout as qir
from test_perf import counted_flops

PROMPTS = ['A sign that says "Open"'] * 4 + ["A red apple on a wooden table, photo, soft light"] * 4
STEPS, CHUNK = 4, 4


def settings(cache="", steps=STEPS):
    return qir.RolloutSettings(height=64, width=64, num_inference_steps=steps, chunk_size=CHUNK, cache=cache)


def lora_pipe(pipe):
    """The tiny pipeline with a LoRA adapter whose B weights are non-zero (a policy that differs from
    the base model)."""
    qi.add_lora(pipe.transformer, 8, 8, qi.TINY_LORA_TARGETS)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=generator))
    return pipe


@pytest.mark.parametrize("spec,parsed", [
    ("", None),
    ("first_block:0.2", ("first_block", {"threshold": 0.2})),
    ("first_block:0", ("first_block", {"threshold": 0.0})),
    ("taylorseer:3", ("taylorseer", {"interval": 3, "warmup": 3, "order": 1})),
    ("taylorseer:2,1,2", ("taylorseer", {"interval": 2, "warmup": 1, "order": 2})),
])
def test_parse_rollout_cache(spec, parsed):
    assert qir.parse_rollout_cache(spec) == parsed


@pytest.mark.parametrize("spec", ["fbc:0.1", "first_block", "first_block:-1", "first_block:x", "first_block:nan",
                                  "first_block:0.1,2", "taylorseer:", "taylorseer:0", "taylorseer:2,1,1,1",
                                  "taylorseer:1.5"])
def test_bad_rollout_cache_is_refused_naming_the_field(spec, tmp_path):
    import train_online_dpo

    with pytest.raises(ValueError, match="config field `rollout_cache`"):
        train_online_dpo.main(["--preset", "cpu_tiny", "--output_dir", str(tmp_path / "run"), "--rollout_cache", spec])


@pytest.mark.parametrize("flags", [["--compile_transformer", "true"], ["--sharding", "fsdp2"]])
def test_rollout_cache_refuses_untested_combinations(flags, tmp_path):
    import train_online_dpo

    with pytest.raises(ValueError, match="config field `rollout_cache`"):
        train_online_dpo.main(["--preset", "cpu_tiny", "--output_dir", str(tmp_path / "run"),
                               "--rollout_cache", "first_block:0.1"] + flags)


def test_cache_skips_blocks_in_the_rollout_only(tiny_pipe):
    """first_block:0 never skips: the same latents bit for bit, every block counted. A huge threshold
    skips every block but the first after the first step: exactly (L + steps - 1) of steps x L block
    forwards per row, and other latents. After each cached rollout no hook is left: the training
    forward (gradient checkpointing off and on, LoRA gradients) equals the one before any rollout."""
    pipe = lora_pipe(tiny_pipe)
    transformer = pipe.transformer
    layers = len(transformer.transformer_blocks)
    cache = qi.PromptCache(pipe, 64)
    seeds = list(range(len(PROMPTS)))
    lengths = perf.text_lengths(cache, PROMPTS)
    assert lengths[0] != lengths[-1]  # two chunks of two text lengths

    x = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(0))
    sigmas = torch.tensor([0.3, 0.8])
    embeds, mask = cache(PROMPTS[:1] + PROMPTS[-1:])

    def training_forward(checkpointing):
        qi.set_gradient_checkpointing(transformer, checkpointing)
        transformer.zero_grad(set_to_none=True)
        out = qi.predict_velocity(transformer, x, sigmas, embeds, mask, 64, 64)
        out.square().mean().backward()
        grads = [p.grad.clone() for n, p in transformer.named_parameters() if "lora_" in n and p.grad is not None]
        qi.set_gradient_checkpointing(transformer, False)
        return out.detach(), grads

    before = {ck: training_forward(ck) for ck in (False, True)}
    plain, _ = qir.rollout(pipe, cache, PROMPTS, seeds, settings(), decode=False)

    counts = []
    latents, _ = qir.rollout(pipe, cache, PROMPTS, seeds, settings("first_block:0"), decode=False, block_forwards=counts)
    assert torch.equal(latents, plain)
    assert counts == [{lengths[0]: STEPS * layers * CHUNK}, {lengths[-1]: STEPS * layers * CHUNK}]

    counts = []
    skipped, _ = qir.rollout(pipe, cache, PROMPTS, seeds, settings("first_block:1000"), decode=False, block_forwards=counts)
    assert counts == [{lengths[0]: (layers + STEPS - 1) * CHUNK}, {lengths[-1]: (layers + STEPS - 1) * CHUNK}]
    assert (skipped - plain).abs().max() > 1e-3
    assert perf.blocks_run_fraction(counts, layers, STEPS * len(PROMPTS)) == (layers + STEPS - 1) / (STEPS * layers)

    assert not transformer.is_cache_enabled
    assert all(not b._diffusers_hook._hook_order for b in transformer.transformer_blocks)
    for ck in (False, True):
        out, grads = training_forward(ck)
        assert torch.equal(out, before[ck][0]) and len(grads) == len(before[ck][1]) > 0
        assert all(torch.equal(a, b) for a, b in zip(grads, before[ck][1]))
    # the rollout after a cached one is the plain rollout again
    again, _ = qir.rollout(pipe, cache, PROMPTS, seeds, settings(), decode=False)
    assert torch.equal(again, plain)


def test_cache_samples_with_the_old_adapter_active(tiny_pipe):
    """NFT samples with its old adapter (policy.adapter_active): the cached rollout runs that adapter
    (first_block:0 equals the uncached old-adapter rollout, which differs from the policy's), and
    leaves the trained adapter active with its requires_grad flags."""
    from policy import OLD_ADAPTER, adapter_active, add_old_adapter

    pipe = lora_pipe(tiny_pipe)
    transformer = pipe.transformer
    add_old_adapter(transformer)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if f".{OLD_ADAPTER}." in name and "lora_B" in name:
                p.mul_(-1.0)  # an old policy unlike the trained one
    cache = qi.PromptCache(pipe, 64)
    seeds = list(range(len(PROMPTS)))
    policy_latents, _ = qir.rollout(pipe, cache, PROMPTS, seeds, settings(), decode=False)
    flags = [p.requires_grad for p in transformer.parameters()]
    with adapter_active(transformer, OLD_ADAPTER):
        old_plain, _ = qir.rollout(pipe, cache, PROMPTS, seeds, settings(), decode=False)
        old_cached, _ = qir.rollout(pipe, cache, PROMPTS, seeds, settings("first_block:0"), decode=False)
        counts = []
        qir.rollout(pipe, cache, PROMPTS, seeds, settings("first_block:1000"), decode=False, block_forwards=counts)
    assert torch.equal(old_cached, old_plain) and (old_plain - policy_latents).abs().max() > 1e-3
    layers = len(transformer.transformer_blocks)
    assert [sum(c.values()) for c in counts] == [(layers + STEPS - 1) * CHUNK] * 2
    assert transformer.active_adapters() == ["default"] and flags == [p.requires_grad for p in transformer.parameters()]


@pytest.mark.parametrize("spec", ["first_block:1000", "taylorseer:2,1"])
def test_counted_rollout_flops_match_torch_flop_counter(tiny_pipe, spec):
    """perf.rollout_step_flops with the counted block forwards equals what torch's FLOP counter sees
    in a real cached rollout (the pipeline's own calls), and is below the uncached count."""
    pipe = lora_pipe(tiny_pipe)
    config = dict(pipe.transformer.config)
    cache = qi.PromptCache(pipe, 64)
    seeds = list(range(len(PROMPTS)))
    lengths = perf.text_lengths(cache, PROMPTS)
    counts = []
    measured = counted_flops(lambda: qir.rollout(pipe, cache, PROMPTS, seeds, settings(spec), decode=False,
                                                block_forwards=counts))
    image_tokens = flop_formula.image_tokens_for(64, 64)
    predicted = perf.rollout_step_flops(config, image_tokens, lengths, CHUNK, STEPS, lora_rank=8,
                                        lora_targets=qi.TINY_LORA_TARGETS, block_forwards=counts)
    full = perf.rollout_step_flops(config, image_tokens, lengths, CHUNK, STEPS, lora_rank=8,
                                   lora_targets=qi.TINY_LORA_TARGETS)
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)
    assert predicted < 0.8 * full


def test_eval_uses_eval_steps_and_never_the_rollout_levers(tmp_path):
    """A run with fewer rollout steps and a step cache evaluates exactly as a run without them (the
    step-0 eval, same model: identical per-image rewards), while its training rollout runs the
    cache (perf/rollout_blocks_run_frac: (L + steps - 1) / (steps L) with a huge threshold)."""
    import train_online_dpo

    def run(name, *flags):
        out = str(tmp_path / name)
        train_online_dpo.main(["--preset", "cpu_tiny", "--output_dir", out, "--max_steps", "1", "--eval_every", "1",
                               "--checkpoint_every", "0", "--sample_grid_every", "0", "--max_eval_prompts", "2",
                               "--eval_samples_per_prompt", "2", "--prompts_per_step", "2", "--samples_per_prompt", "4",
                               "--rollout_chunk_size", "8", *flags])
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
        return [r for r in rows if "eval/rewards" in r], [r for r in rows if "reward/mean" in r][0]

    plain_evals, plain_step = run("plain", "--num_inference_steps", "4")
    lever_evals, lever_step = run("levers", "--num_inference_steps", "2", "--rollout_cache", "first_block:1000")
    assert plain_evals[0]["eval/rewards"] == lever_evals[0]["eval/rewards"]
    assert "perf/rollout_blocks_run_frac" not in plain_step
    layers = qi.TINY_SIZES["tiny"]["num_layers"]
    assert lever_step["perf/rollout_blocks_run_frac"] == (layers + 2 - 1) / (2 * layers)
    assert lever_step["perf/rollout_tflop"] < 0.5 * plain_step["perf/rollout_tflop"]
    assert lever_step["reward/mean"] != plain_step["reward/mean"]


def test_planner_rollout_flops_with_a_blocks_run_fraction_equal_the_counted_ones():
    """flop_formula.rollout_flops(blocks_run_frac) (what benchmarks/plan.py predicts with) equals
    rollout_step_flops with block counts of that fraction, at the real config."""
    config = qi.QWEN_IMAGE_TRANSFORMER_CONFIG
    image_tokens, text, steps, images = flop_formula.image_tokens_for(512, 512), 64, 35, 16
    layers = config["num_layers"]
    run = (layers + steps - 1) * images  # first-block cache skipping every step after the first
    kw = dict(lora_rank=64, lora_targets=qi.RECIPE_LORA_TARGETS)
    counted = perf.rollout_step_flops(config, image_tokens, [text] * images, images, steps, block_forwards=[{text: run}], **kw)
    frac = run / (steps * images * layers)
    planned = flop_formula.rollout_flops(config, image_tokens, text, steps, images, blocks_run_frac=frac, **kw)
    assert abs(planned - counted) <= 1e-9 * counted
    assert planned < 0.1 * flop_formula.rollout_flops(config, image_tokens, text, steps, images, **kw)
