"""Performance accounting and levers: the FLOP formula against torch's FLOP counter, the planner's
LoRA count on the real architecture and its memory model against a measured peak."""

import importlib.util
import os

import pytest
import torch

import flop_formula
import perf
import qwen_image as qi
import qwen_image_rollout as qir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def counted_flops(fn) -> int:
    """Matmul FLOPs torch's FlopCounterMode sees. CPU SDPA runs its own flash kernel, which the
    counter does not know: it is mapped to the formulas torch uses for the GPU flash kernels."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

    aten = torch.ops.aten
    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda grad, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(grad, q, k, v),
    }
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    return counter.get_total_flops()


def test_flop_formula_matches_torch_flop_counter(tiny_pipe):
    transformer = tiny_pipe.transformer
    config = dict(transformer.config)
    batch, image_tokens, text_tokens = 2, 16, 12  # 64x64 images, 12 prompt tokens
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, image_tokens, 64, generator=generator)
    embeds = torch.randn(batch, text_tokens, config["joint_attention_dim"], generator=generator)
    sigmas = torch.tensor([0.3, 0.7])

    def forward(backward=False):
        out = qi.predict_velocity(transformer, x, sigmas, embeds, None, 64, 64)
        if backward:
            out.float().square().mean().backward()

    def close(measured, predicted):
        assert measured > 0 and abs(predicted - measured) / measured < 0.05, (predicted, measured)

    with torch.no_grad():
        close(counted_flops(forward), batch * flop_formula.forward_flops(config, image_tokens, text_tokens))
    targets = qi.RECIPE_LORA_TARGETS
    qi.add_lora(transformer, rank=8, alpha=8, target_modules=targets)
    with torch.no_grad():
        close(counted_flops(forward), batch * flop_formula.forward_flops(config, image_tokens, text_tokens, 8, targets))
    for checkpointing in (False, True):
        qi.set_gradient_checkpointing(transformer, checkpointing)
        predicted = batch * (flop_formula.forward_flops(config, image_tokens, text_tokens, 8, targets)
                             + flop_formula.backward_flops(config, image_tokens, text_tokens, "lora", 8, targets, checkpointing))
        close(counted_flops(lambda: forward(backward=True)), predicted)
    # the DPO update of one pair = reference forward + policy forward and backward, per sample
    assert perf.dpo_update_flops(config, image_tokens, text_tokens, 1, "lora", 8, targets, True) == predicted + \
        batch * flop_formula.forward_flops(config, image_tokens, text_tokens)


@pytest.mark.parametrize("name,micro_batch_groups,true_cfg_scale", [("dgpo", 1, 1.0), ("nft", 2, 1.0), ("awm", 1, 1.0),
                                                                      ("awm", 1, 2.0)])
def test_group_update_flops_match_the_counter_on_a_real_update(tiny_dir, name, micro_batch_groups, true_cfg_scale):
    """What a group objective logs as perf/update_tflop (perf.update_flops: reference, old and
    policy forwards and the backward, per micro-batch at its longest prompt) against torch's counter
    around the real update: 4 groups of 4 rows (the tied one trained too), prompts of different lengths, 2 updates. With
    true_cfg_scale 2 every prediction also runs on the negative prompt (twice the forwards)."""
    import objective_worker
    import objectives
    import distributed
    from policy import Policy

    config = objective_worker.config_for(name, tiny_dir, "none", ["--micro_batch_groups", str(micro_batch_groups),
                                                                  "--true_cfg_scale", str(true_cfg_scale),
                                                                  "--negative_prompt", "blurry, low quality"])
    accelerator = distributed.make_accelerator(config)
    pipe = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    cache = qi.PromptCache(pipe, config.max_sequence_length)
    cache.warm(objective_worker.PROMPTS + [config.negative_prompt])
    objective = objectives.build(config)
    policy = Policy(config, pipe, accelerator, old_adapter=objective.uses_old_adapter)
    assert objective.uses_old_adapter and objective.needs_reference  # all three forwards run and are counted
    logged = []
    counted = counted_flops(lambda: logged.append(objective.update(policy, objective_worker.rollouts_for(0, 0, 1),
                                                                   cache, 0)[0]))
    predicted = logged[0]["perf/update_tflop"] * 1e12
    assert logged[0]["adv/samples_kept"] == 16 and abs(predicted - counted) / counted < 0.02, (predicted, counted)
    # the tolerance tells the forwards apart: without the old adapter's the formula is ~25 % short,
    # without the negative prompt's (under true CFG) ~50 %
    lengths = perf.text_lengths(cache, objective_worker.rollouts_for(0, 0, 1).prompts)
    lengths = lengths[:4] + lengths[8:]  # group 1 ties and is dropped
    negative = perf.text_lengths(cache, [config.negative_prompt])[0] if true_cfg_scale > 1 else None
    common = (pipe.transformer.config, 16, lengths, 4 * micro_batch_groups, config.updates_per_rollout, "lora",
              config.lora_rank, tuple(config.lora_targets.split(",")))
    without_old = perf.update_flops(*common, old=False, negative_length=negative)
    assert (counted - without_old) / counted > 0.1
    if true_cfg_scale > 1:
        assert perf.update_flops(*common, old=True) / counted < 0.55


def test_dpo_update_flops_match_the_counter_on_a_real_update_with_true_cfg(tiny_dir):
    """DPO's perf/update_tflop against torch's counter around objectives.DPO.update with true_cfg_scale
    2: 4 best/worst pairs over 2 micro-batches, reference and policy forwards on both the prompt and
    the negative prompt, the backward through both."""
    import objective_worker
    import objectives
    import distributed
    from policy import Policy

    config = objective_worker.config_for("dpo", tiny_dir, "none", ["--micro_batch_pairs", "2", "--true_cfg_scale", "2",
                                                                   "--negative_prompt", "blurry, low quality"])
    accelerator = distributed.make_accelerator(config)
    pipe = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    cache = qi.PromptCache(pipe, config.max_sequence_length)
    cache.warm(objective_worker.PROMPTS + [config.negative_prompt])
    policy = Policy(config, pipe, accelerator)
    rollouts = objective_worker.rollouts_for(0, 0, 1)
    logged = []
    counted = counted_flops(lambda: logged.append(objectives.DPO(config).update(policy, rollouts, cache, 0)[0]))
    predicted = logged[0]["perf/update_tflop"] * 1e12
    assert logged[0]["pairs/kept"] == 3 and abs(predicted - counted) / counted < 0.02, (predicted, counted)
    lengths = perf.text_lengths(cache, [p for p in rollouts.prompts[::4] if p != rollouts.prompts[4]])
    pair_lengths = [n for n in lengths for _ in range(2)]
    without_negative = perf.update_step_flops(pipe.transformer.config, 16, pair_lengths, 2, config.updates_per_rollout,
                                              "lora", config.lora_rank, tuple(config.lora_targets.split(",")))
    assert without_negative / counted < 0.55  # the old count: half the work


def test_flop_formula_full_training_matches_counter(tiny_pipe):
    transformer = tiny_pipe.transformer
    config = dict(transformer.config)
    transformer.requires_grad_(True)
    for name in qi.dead_text_stream_modules(transformer):
        transformer.get_submodule(name).requires_grad_(False)
    x, embeds = torch.randn(1, 16, 64), torch.randn(1, 9, config["joint_attention_dim"])

    def step():
        qi.predict_velocity(transformer, x, torch.tensor([0.5]), embeds, None, 64, 64).square().mean().backward()

    predicted = flop_formula.forward_flops(config, 16, 9) + flop_formula.backward_flops(config, 16, 9, "full")
    measured = counted_flops(step)
    assert abs(predicted - measured) / measured < 0.05, (predicted, measured)


def test_real_size_forward_flops_and_throughput():
    config = qi.QWEN_IMAGE_TRANSFORMER_CONFIG
    tokens = flop_formula.image_tokens_for(512, 512)
    assert tokens == 1024
    # ~15.7 TFLOP per forward at 512x512 with 64 text tokens; the recipe's rollout ~2.8e17 per step
    assert flop_formula.forward_flops(config, tokens, 64) / 1e12 == pytest.approx(15.67, abs=0.01)
    assert flop_formula.rollout_flops(config, tokens, 64, steps=35, images=512) == pytest.approx(2.81e17, rel=0.01)
    assert flop_formula.rollout_flops(config, tokens, 64, 35, 1, cfg=True) == 2 * flop_formula.rollout_flops(config, tokens, 64, 35, 1)
    assert flop_formula.throughput(2e15, 2.0, peak_tflops=1000, devices=1) == {"tflops_per_device": 1000.0, "mfu": 1.0}


def test_planner_counts_recipe_lora_exactly_on_the_real_architecture():
    plan = load_benchmark("plan")
    transformer = plan.build_meta_transformer(qi.QWEN_IMAGE_TRANSFORMER_CONFIG, "lora", 64, 128, qi.RECIPE_LORA_TARGETS)
    params = plan.count_params(transformer)
    assert params["base"] == 20_430_401_088
    # rank 64 on the 12 recipe suffixes: 424,673,280 (DESIGN.md); add_lora skips the last block's dead
    # text-stream modules: to_add_out and txt_mlp (2,359,296; DESIGN's 422,313,984) and add_q_proj
    # (text queries only produce text outputs, never read: 64 * (3072 + 3072) = 393,216)
    d, f = 3072, 4 * 3072
    dead = 64 * ((d + d) + (d + d) + (d + f) + (f + d))
    assert 424_673_280 - 2_359_296 == 422_313_984
    assert params["trainable"] == 424_673_280 - dead == 421_920_768
    with pytest.raises(ValueError, match=r"\['to_qkv'\] do not exist"):
        plan.build_meta_transformer(dict(qi.QWEN_IMAGE_TRANSFORMER_CONFIG, num_layers=1), "lora", 4, 4, ("to_q", "to_qkv"))


def test_planner_activation_memory_matches_measured_peak():
    """Predicted vs measured peak of one DPO micro-batch (reference forward, policy forward,
    backward) on a small model, with and without gradient checkpointing, measured in a fresh
    process (tests/memory_worker.py): the peak resident set of a process that has run other tests
    (tracker threads, OCR sessions, allocator caches) moves by more than the 20 % tolerance."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "memory_worker.py")], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    cases = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(cases) == 2
    for case in cases:
        assert abs(case["predicted"] - case["measured"]) / case["measured"] < 0.20, case


def memory_cases(kind: str) -> list[dict]:
    """tests/memory_worker.py KIND in a fresh process (see test_planner_activation_memory_matches_measured_peak)."""
    import json
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "memory_worker.py"), kind], capture_output=True,
                          text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_planner_group_micro_batch_is_a_whole_group_of_rows():
    """A group objective's smallest micro-batch is one whole group: K = 8 rows (reference, old
    adapter and policy forwards, checkpointed). Measured peak vs the planner's activations at K rows;
    at the 2 rows of a DPO pair it would be ~4x short."""
    (case,) = memory_cases("group")
    assert case["rows"] == 8 and abs(case["predicted"] - case["measured"]) / case["measured"] < 0.20, case


@pytest.mark.slow
def test_planner_vae_decode_working_set_matches_a_measured_decode():
    """plan.vae_decode_peak_bytes (live tensors traced on the meta device) against a real decode of the
    tiny pipeline's VAE architecture at two widths; the CPU's conv3d workspace comes on top of it."""
    cases = memory_cases("vae")
    assert len(cases) == 2
    for case in cases:
        assert abs(case["predicted"] - case["measured"]) / case["measured"] < 0.05, case
        assert case["peak_with_workspace"] >= case["measured"]


def test_planner_vae_decode_working_set_of_the_real_vae():
    """The published Qwen-Image VAE in bf16 holds ~57 MB of live tensors per 128x128 image while it
    decodes (measured before on the real decoder at batch 1), linear in pixels and batch: a 16-image
    chunk at 512x512 needs ~14.5 GB, which the planner now counts."""
    from diffusers import AutoencoderKLQwenImage

    plan = load_benchmark("plan")
    with torch.device("meta"):
        vae = AutoencoderKLQwenImage().to(torch.bfloat16)
    assert sum(p.numel() for p in vae.parameters()) == plan.VAE_PARAMS
    one = plan.vae_decode_peak_bytes(vae, 1, 128, 128)
    assert one == pytest.approx(57e6, rel=0.02)
    chunk = plan.vae_decode_peak_bytes(vae, 16, 512, 512)
    assert chunk == pytest.approx(16 * 16 * one, rel=0.02) and chunk == pytest.approx(14.5e9, rel=0.01)


@pytest.mark.slow
def test_planner_old_adapter_and_full_reference_copy_match_measured_memory():
    """The old adapter adds the trainable LoRA's fp32 bytes; full mode's reference is a copy of the
    fp32 policy: base parameters x 4 bytes (the old planner counted them at --dtype, half of it)."""
    for case in memory_cases("weights"):
        assert abs(case["predicted"] - case["measured"]) / case["measured"] < 0.15, case
        if case["what"] == "frozen_reference_copy":
            assert case["at_dtype"] < 0.6 * case["measured"]


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--objective", "nft"], ["--train_mode", "full"], ["--true_cfg_scale", "4"]])
def test_planner_prints_every_term(flags, capsys):
    """plan.py's new rows on the real architecture: the VAE decode working set in every plan, the
    old adapter and a whole group (K = 16 rows) per micro-batch with a group objective, the fp32
    reference copy in full mode, the host memory of the text encoder, and true CFG doubling the
    update's FLOPs."""
    plan = load_benchmark("plan")
    result = plan.main(["--world_size", "4"] + flags)
    out = capsys.readouterr().out
    ddp = result["memory_gb"]["ddp"]
    assert ddp["vae_decode_working_set"] == pytest.approx(14.5, rel=0.01) and "vae_decode_working_set" in out
    assert result["text_encoder_host_gb_per_process"] == pytest.approx(16.58, abs=0.01) and "text encoder 16.6 GB" in out
    assert ddp["total_checkpointed"] == pytest.approx(sum(v for k, v in ddp.items() if not k.startswith(
        ("activations", "rollout", "vae_decode", "total"))) + max(ddp["activations_checkpointed"],
                                                                    ddp["rollout_working_set"], ddp["vae_decode_working_set"]))
    if flags == ["--objective", "nft"]:
        assert result["micro_batch_rows"] == 16 and result["old_adapter"] and "old_adapter_fp32" in out
        assert ddp["old_adapter_fp32"] == pytest.approx(421_920_768 * 4 / 1e9)
        assert ddp["activations_checkpointed"] == pytest.approx(12.35, abs=0.01)
    elif flags == ["--train_mode", "full"]:
        assert ddp["frozen_reference_copy_fp32"] == pytest.approx(20_430_401_088 * 4 / 1e9) and "reference_copy_fp32" in out
    elif flags == ["--true_cfg_scale", "4"]:
        base = plan.main(["--world_size", "4"])
        ratio = result["update_pflop_per_gpu_checkpointed"] / base["update_pflop_per_gpu_checkpointed"]
        assert 1.7 < ratio < 2.0  # the negative prompt (8 tokens) is shorter than the prompt (64)
    else:
        assert result["micro_batch_rows"] == 2 and not result["old_adapter"] and "old_adapter_fp32" not in out


# ---------------------------------------------------------------------------------- levers


def test_native_attention_backend_is_bit_identical_and_unusable_backends_fail(tiny_pipe):
    transformer = tiny_pipe.transformer
    x, embeds = torch.randn(2, 16, 64), torch.randn(2, 12, 32)
    sigmas = torch.tensor([0.2, 0.9])
    with torch.no_grad():
        default = qi.predict_velocity(transformer, x, sigmas, embeds, None, 64, 64)
        perf.set_attention_backend(transformer, "native")
        native = qi.predict_velocity(transformer, x, sigmas, embeds, None, 64, 64)
    assert torch.equal(default, native)
    assert "native" in perf.available_attention_backends()
    if not torch.cuda.is_available():
        assert "flash" not in perf.available_attention_backends()
        with pytest.raises(ValueError, match=r"config field `attention_backend`: 'flash' is not usable.*available: .*native"):
            perf.check_attention_backend("flash")
    with pytest.raises(ValueError, match="attention_backend.*'fast' is not usable"):
        perf.check_attention_backend("fast")


def test_regional_compile_matches_eager_and_does_not_recompile_after_warm_up(tiny_pipe):
    """One small compile (the block, no grad). The CI test uses the aot_eager backend (dynamo
    capture + AOT autograd, no code generation: an inductor compile takes ~2.5 min on 2 busy cores);
    benchmarks/gpu_check.py --tiny runs inductor (measured max |diff| 3.6e-7 in fp32)."""
    import torch._dynamo

    transformer = tiny_pipe.transformer
    qi.add_lora(transformer, 8, 8, qi.RECIPE_LORA_TARGETS)
    x, embeds = torch.randn(2, 16, 64), torch.randn(2, 12, 32)
    sigmas = [torch.tensor([0.2, 0.9]), torch.tensor([0.5, 0.1])]
    with torch.no_grad():
        eager = [qi.predict_velocity(transformer, x, s, embeds, None, 64, 64) for s in sigmas]
    counter = perf.CompileCounter()
    perf.compile_transformer_blocks(transformer, backend="aot_eager")
    try:
        with torch.no_grad():
            first = qi.predict_velocity(transformer, x, sigmas[0], embeds, None, 64, 64)
            warm_up = counter.new()
            second = qi.predict_velocity(transformer, x, sigmas[1], embeds, None, 64, 64)  # a new sigma: same graph
        assert warm_up >= 1 and counter.new() == 0
        assert torch.allclose(first, eager[0], atol=1e-5, rtol=0) and torch.allclose(second, eager[1], atol=1e-5, rtol=0)
    finally:
        torch._dynamo.reset()


def test_overlapped_rewards_and_latents_equal_the_sequential_path(tiny_pipe):
    from rewards import build_reward

    overlap = load_benchmark("bench_reward_overlap")
    prompts = overlap.prompts_for(6)
    seeds = list(range(100, 106))
    settings = qir.RolloutSettings(height=64, width=64, num_inference_steps=2, chunk_size=4)  # chunks of 4 and 2 (+2 padding)
    cache = qi.PromptCache(tiny_pipe, 64)
    with overlap.SlowOcrServer(seconds_per_image=0.0) as server:
        reward_fn = build_reward("ocr_server", base_url=server.url, model="m", concurrency=2, timeout=30)
        latents, rewards = overlap.sequential(tiny_pipe, cache, prompts, seeds, settings, reward_fn)
        latents_overlapped, rewards_overlapped = overlap.overlapped(tiny_pipe, cache, prompts, seeds, settings, reward_fn)
        assert server.requests == 12
    assert torch.equal(latents, latents_overlapped) and rewards == rewards_overlapped
    assert len(set(rewards)) > 1  # the server's answers differ per image, so an order mix-up would show
    chunks = []
    latents_plain, images_plain = qir.rollout(tiny_pipe, cache, prompts, seeds, settings)
    _, images = qir.rollout(tiny_pipe, cache, prompts, seeds, settings,
                           on_chunk=lambda start, z, ims: chunks.append((start, z.shape[0], len(ims))))
    assert chunks == [(0, 4, 4), (4, 2, 2)] and torch.equal(latents_plain, latents)
    assert [im.tobytes() for im in images] == [im.tobytes() for im in images_plain]


def test_online_trainer_with_reward_overlap_logs_the_same_step_and_flops(tmp_path):
    import json

    import train_online_dpo

    runs = {}
    for overlap in ("false", "true"):
        out = str(tmp_path / overlap)
        train_online_dpo.main(["--preset", "cpu_tiny", "--output_dir", out, "--max_steps", "1", "--eval_every", "0",
                               "--checkpoint_every", "0", "--rollout_chunk_size", "16", "--reward_overlap", overlap,
                               "--peak_tflops", "1.0"])
        with open(os.path.join(out, "metrics.jsonl")) as f:
            runs[overlap] = json.loads(f.readline())
    for key in ("reward/mean", "reward/std", "dpo/loss", "pairs/kept", "perf/rollout_tflop", "perf/update_tflop"):
        assert runs["true"][key] == runs["false"][key], key
    row = runs["true"]
    assert row["perf/rollout_tflop"] > 0 and row["perf/update_tflop"] > 0 and 0 < row["perf/mfu"] < 1


@pytest.mark.parametrize("flags,field", [
    (["--attention_backend", "flash_attn_9"], "attention_backend"),
    (["--peak_tflops", "-1"], "peak_tflops"),
    (["--compile_backend", "tensorrt"], "compile_backend"),
    (["--compile_transformer", "true", "--sharding", "fsdp2"], "compile_transformer"),
])
def test_speed_lever_config_validation(flags, field, tmp_path):
    import train_offline_dpo
    import train_online_dpo

    common = ["--preset", "cpu_tiny", "--output_dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=f"config field `{field}`"):
        train_online_dpo.main(common + flags)
    with pytest.raises(ValueError, match=f"config field `{field}`"):
        train_offline_dpo.main(common + ["--pairs_path", __file__] + flags)


def test_gpu_check_runs_end_to_end_on_the_tiny_model(tmp_path):
    """benchmarks/gpu_check.py --tiny: the real-size GPU check's code path on CPU (compile left out
    here; it is the regional compile tested above)."""
    import json

    gpu_check = load_benchmark("gpu_check")
    out = tmp_path / "gpu_check.json"
    result = gpu_check.main(["--tiny", "--no_compile", "--images", "2", "--pairs", "1", "--text_tokens", "8",
                             "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["rollout"] == result["rollout"] and saved["device"] == "cpu"
    assert saved["rollout"]["eager_native"]["images_per_s"] > 0
    assert saved["rollout"]["eager_native"]["tflops_per_s"] > 0
    assert saved["dpo_update_eager"]["seconds_per_pair"] > 0
    # the cheaper rollouts: a step cache (first_block:0.1 by default) and 2 steps instead of 4
    cached = saved["rollout"]["eager_native_cache_first_block_0.1"]
    assert 0 < cached["blocks_run_frac"] <= 1 and cached["images_per_s"] > 0
    assert saved["rollout"]["eager_native_2_steps"]["images_per_s"] > 0


@pytest.mark.parametrize("kl_weight", [0.04, 0.0])
def test_grpo_update_flops_match_the_counter_on_a_real_update(tiny_dir, kl_weight):
    """grpo's perf/update_tflop: per kept row, one policy forward + backward (+ the reference forward
    when the KL is on) per TRAINED STEP, not one per row, against torch's counter around the real
    update (3 kept groups of 4 rows, 2 trained steps, 2 updates)."""
    import objective_worker
    import objectives
    import distributed
    from policy import Policy

    # every row in both updates (the old update; the official one, each kept row once, measured 1.1 % off)
    config = objective_worker.config_for("grpo", tiny_dir, "none", ["--grpo_kl_weight", str(kl_weight),
                                                                     "--update_split", "all", "--grpo_keep_zero_advantage"])
    accelerator = distributed.make_accelerator(config)
    pipe = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    cache = qi.PromptCache(pipe, config.max_sequence_length)
    cache.warm(objective_worker.PROMPTS)
    objective = objectives.build(config)
    policy = Policy(config, pipe, accelerator)
    assert objective.needs_reference == (kl_weight > 0)
    batch = objective_worker.rollouts_for(0, 0, 1, objective_worker.grpo_trajectory(policy, cache, 0))
    logged = []
    counted = counted_flops(lambda: logged.append(objective.update(policy, batch, cache, 0)[0]))
    predicted = logged[0]["perf/update_tflop"] * 1e12
    assert logged[0]["adv/samples_kept"] == 16 and abs(predicted - counted) / counted < 0.02, (predicted, counted)
    once = perf.update_flops(pipe.transformer.config, 16, perf.text_lengths(cache, batch.prompts),
                             4, config.updates_per_rollout, "lora", config.lora_rank,
                             tuple(config.lora_targets.split(",")), reference=kl_weight > 0)
    assert predicted == pytest.approx(2 * once, rel=1e-12)  # 2 trained steps: twice one pass over the rows
