"""The rollout: QwenImagePipeline itself as the sampler, in chunks with one generator per image
(`rollout`), the step caches of diffusers for training rollouts (`rollout_cache`, with the block
forwards counted for the FLOP accounting), Flow-GRPO's SDE recorder run inside the pipeline
(`SDERecorder`) and the sampler's own sigmas (`sampler_sigmas`). Conventions: qwen_image.py.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from qwen_image import PromptCache, decode_latents

if TYPE_CHECKING:
    from diffusers import QwenImagePipeline


@dataclass
class RolloutSettings:
    height: int = 512
    width: int = 512
    num_inference_steps: int = 35
    true_cfg_scale: float = 1.0
    negative_prompt: str = " "
    chunk_size: int = 16  # images per pipeline call
    # Run a short last chunk at the full chunk size (padding rows are discarded). BLAS kernels are
    # chosen by shape, so only equal shapes make an image depend on its seed alone, bit for bit.
    fixed_chunk_shape: bool = True
    # Step caching for this rollout only (parse_rollout_cache): "" = off. The trainers' evaluation
    # never sets it, and the hooks are removed before rollout returns.
    cache: str = ""


# ----------------------------------------------------------------------------------------------
# Rollout step caching (diffusers' own cache hooks; diffusers/hooks/*.py, enabled through the
# transformer's CacheMixin.enable_cache)

# name -> (parameters in order, the default of each trailing optional one)
ROLLOUT_CACHES = {
    # FirstBlockCacheConfig.threshold: the remaining blocks are skipped (their last residual reused)
    # when the first block's output residual changed by less than this relative mean absolute
    # difference since the last full step; one decision per pipeline call and step for the whole batch.
    "first_block": ("threshold",),
    # TaylorSeerCacheConfig in lite mode: every block is skipped on the steps between full ones and the
    # output projection extrapolated by a Taylor series; interval = cache_interval, warmup =
    # disable_cache_before_step (full steps first), order = max_order.
    "taylorseer": ("interval", "warmup", "order"),
}
_TAYLORSEER_DEFAULTS = {"warmup": 3, "order": 1}  # TaylorSeerCacheConfig's own defaults


def parse_rollout_cache(spec: str) -> tuple[str, dict] | None:
    """'' -> None; 'first_block:0.2' -> ('first_block', {'threshold': 0.2});
    'taylorseer:3', 'taylorseer:3,2' or 'taylorseer:3,2,1' -> ('taylorseer', {'interval', 'warmup',
    'order'}). Raises ValueError saying what is wrong (no diffusers import: config-time check)."""
    if not spec:
        return None
    name, _, values = spec.partition(":")
    if name not in ROLLOUT_CACHES:
        raise ValueError(f"unknown cache {name!r}: use one of {', '.join(ROLLOUT_CACHES)} ('' = off)")
    keys = ROLLOUT_CACHES[name]
    parts = [v.strip() for v in values.split(",")] if values.strip() else []
    if name == "first_block":
        if len(parts) != 1:
            raise ValueError("first_block takes one threshold, e.g. 'first_block:0.2'")
        try:
            threshold = float(parts[0])
        except ValueError:
            raise ValueError(f"first_block threshold {parts[0]!r} is not a number") from None
        if not (threshold >= 0 and threshold < float("inf")):
            raise ValueError("first_block threshold must be a finite number >= 0 (0 never skips)")
        return name, {"threshold": threshold}
    if not 1 <= len(parts) <= len(keys):
        raise ValueError("taylorseer takes 'interval[,warmup[,order]]', e.g. 'taylorseer:3,2'")
    try:
        numbers = [int(v) for v in parts]
    except ValueError:
        raise ValueError(f"taylorseer values {values!r} must be integers") from None
    params = {**_TAYLORSEER_DEFAULTS, **dict(zip(keys, numbers))}
    if params["interval"] < 1 or params["warmup"] < 0 or params["order"] < 0:
        raise ValueError("taylorseer needs interval >= 1, warmup >= 0 and order >= 0")
    return name, params


def rollout_cache_config(spec: str):
    """The diffusers cache config for a parse_rollout_cache spec (None when off)."""
    parsed = parse_rollout_cache(spec)
    if parsed is None:
        return None
    name, params = parsed
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    if name == "first_block":
        return FirstBlockCacheConfig(threshold=params["threshold"])
    return TaylorSeerCacheConfig(cache_interval=params["interval"], disable_cache_before_step=params["warmup"],
                                 max_order=params["order"], taylor_factors_dtype=torch.float32, use_lite_mode=True)


_BLOCK_COUNTER_HOOK = "rollout_block_counter"


@contextlib.contextmanager
def counting_block_forwards(transformer, counts: dict):
    """Counts the transformer blocks' forwards that really run: counts[text_tokens] += rows, once per
    block forward. A diffusers hook registered on each block *before* a cache is enabled sits under
    the cache's hooks, so a block the cache skips never reaches it (a torch forward hook would fire on
    the skipped call too). Removed on exit."""
    from diffusers.hooks import HookRegistry, ModelHook

    class CountBlockForward(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            text = kwargs["encoder_hidden_states"] if "encoder_hidden_states" in kwargs else args[1]
            counts[int(text.shape[1])] = counts.get(int(text.shape[1]), 0) + int(hidden.shape[0])
            return self.fn_ref.original_forward(*args, **kwargs)

    blocks = list(transformer.transformer_blocks)
    for block in blocks:
        HookRegistry.check_if_exists_or_initialize(block).register_hook(CountBlockForward(), _BLOCK_COUNTER_HOOK)
    try:
        yield counts
    finally:
        for block in blocks:
            block._diffusers_hook.remove_hook(_BLOCK_COUNTER_HOOK, recurse=False)


@contextlib.contextmanager
def rollout_cache(transformer, spec: str):
    """Enables the cache `spec` on the transformer for the duration (nothing when spec is ''), and
    always disables it on exit, so no training forward or evaluation ever runs through it."""
    config = rollout_cache_config(spec)
    if config is None:
        yield
        return
    transformer.enable_cache(config)
    try:
        yield
    finally:
        transformer.disable_cache()


@torch.no_grad()
def rollout(pipe: QwenImagePipeline, prompt_cache: PromptCache, prompts: list[str], seeds: list[int],
            settings: RolloutSettings, decode: bool = True, on_chunk=None, block_forwards: list | None = None,
            scheduler_step=None):
    """One image per (prompt, seed) with the pipeline's own sampler, in chunks.

    For K samples per prompt pass each prompt K times with K seeds (prompts are never expanded with
    `num_images_per_prompt`, whose mask ordering is wrong in diffusers 0.42). Each image has its own
    generator and every chunk has the same shape, so an image depends on its seed only, not on the
    chunk it was made in (bit for bit when the chunk's prompts have equal token lengths; mixed
    lengths pad the text and agree to ~1e-6).
    Each chunk is decoded as soon as it is sampled (the same batches as decoding at the end, so the
    same images) and, if given, handed to `on_chunk(start, latents [n, S, 64], images or None)`
    before the next chunk starts: a caller can score chunk i while chunk i+1 is sampled.
    With `settings.cache` the pipeline calls run under that step cache (rollout_cache); the cache's
    skip decisions are made for a whole chunk at once, so a cached image also depends on its chunk.
    `block_forwards`, if given, receives one dict per chunk, {text tokens: block forwards x rows
    actually run} (counting_block_forwards; the FLOP accounting reads it).
    `scheduler_step(scheduler, generators, n_real)`, if given, returns the step function that replaces
    `pipe.scheduler.step` during each chunk's pipeline call (e.g. `SDERecorder.chunk_step`: Flow-GRPO's
    SDE sampler), the chunk's per-image generators (already past the initial noise) and real rows.
    Returns (packed latents [N, S, 64] float32 on CPU, PIL images or None).
    """
    assert len(prompts) == len(seeds)
    if block_forwards is not None:  # the counter first: it must sit under the cache's hooks
        with counting_block_forwards(pipe.transformer, {}) as counts, rollout_cache(pipe.transformer, settings.cache):
            def count_chunk(start, latents, images):
                block_forwards.append(dict(counts))
                counts.clear()
                if on_chunk is not None:
                    on_chunk(start, latents, images)
            return _rollout(pipe, prompt_cache, prompts, seeds, settings, decode, count_chunk, scheduler_step)
    with rollout_cache(pipe.transformer, settings.cache):
        return _rollout(pipe, prompt_cache, prompts, seeds, settings, decode, on_chunk, scheduler_step)


def _rollout(pipe, prompt_cache, prompts, seeds, settings, decode, on_chunk, scheduler_step=None):
    transformer_dtype = pipe.transformer.dtype
    do_cfg = settings.true_cfg_scale > 1.0
    prompt_cache.warm(list(prompts) + ([settings.negative_prompt] if do_cfg else []))
    all_latents, all_images = [], []
    for start in range(0, len(prompts), settings.chunk_size):
        chunk = prompts[start:start + settings.chunk_size]
        chunk_seeds = seeds[start:start + settings.chunk_size]
        n_real = len(chunk)
        if settings.fixed_chunk_shape and n_real < settings.chunk_size:
            pad = settings.chunk_size - n_real
            chunk, chunk_seeds = chunk + chunk[-1:] * pad, chunk_seeds + chunk_seeds[-1:] * pad
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in chunk_seeds]
        embeds, mask = prompt_cache(chunk, device=pipe._execution_device, dtype=transformer_dtype)
        kwargs = {}
        if do_cfg:
            neg_embeds, neg_mask = prompt_cache([settings.negative_prompt] * len(chunk),
                                                device=pipe._execution_device, dtype=transformer_dtype)
            kwargs = dict(negative_prompt_embeds=neg_embeds, negative_prompt_embeds_mask=neg_mask)
        with _scheduler_step_replaced(pipe, scheduler_step, generators, n_real):
            latents = pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, true_cfg_scale=settings.true_cfg_scale,
                           height=settings.height, width=settings.width,
                           num_inference_steps=settings.num_inference_steps, generator=generators,
                           output_type="latent", return_dict=False, **kwargs)[0]
        chunk_latents = latents[:n_real].float().cpu()
        all_latents.append(chunk_latents)
        chunk_images = None
        if decode:
            chunk_images = decode_latents(pipe, chunk_latents, settings.height, settings.width, settings.chunk_size)
            all_images += chunk_images
        if on_chunk is not None:
            on_chunk(start, chunk_latents, chunk_images)
    return torch.cat(all_latents), (all_images if decode else None)


@contextlib.contextmanager
def _scheduler_step_replaced(pipe, scheduler_step, generators, n_real):
    if scheduler_step is None:
        yield
        return
    scheduler = pipe.scheduler
    scheduler.step = scheduler_step(scheduler, generators, n_real)  # an instance attribute shadows the method
    try:
        yield
    finally:
        del scheduler.step


class SDERecorder:
    """Flow-GRPO's SDE sampler run by QwenImagePipeline itself: `rollout(..., scheduler_step=
    recorder.chunk_step)` keeps the pipeline's timesteps (its dynamic shift mu from the image sequence
    length), transformer calls and true CFG, and replaces only the scheduler's update: at the SDE
    steps x_next = flow_grpo's SDE step with noise level a (fp32, cast back to the pipeline's latent
    dtype as its Euler step does), elsewhere the scheduler's own Euler step. The noise of image b
    comes from its own generator (the one that drew its initial latents), so a trajectory depends on
    its seed only. For each trained step j it records x_j, x_{j+1} (exactly the tensors the pipeline
    fed to and got from the step) and log p(x_{j+1} | x_j) of the recorded x_{j+1}.

    `result()` after the rollout: dict with before [N, T, S, 64], after [N, T, S, 64] (the pipeline's
    latent dtype, CPU), log_probs [N, T] fp32, sigmas [T], sigmas_next [T] (fp32), sigma_max (the
    scheduler's s_1), steps (the trained step indices) and noise_level; N = the rollout's images in
    order, T = len(trained_steps)."""

    def __init__(self, noise_level: float, sde_steps, trained_steps):
        self.noise_level = float(noise_level)
        self.sde_steps, self.trained_steps = set(sde_steps), list(trained_steps)
        self.chunks = []

    def chunk_step(self, scheduler, generators, n_real):
        import flow_grpo

        original = type(scheduler).step.__get__(scheduler)
        record = {"before": [], "after": [], "log_probs": [], "sigmas": [], "sigmas_next": []}
        self.chunks.append(record)
        calls = [0]

        def step(model_output, timestep, sample, return_dict=False, **kwargs):
            i = calls[0]
            calls[0] += 1
            euler = original(model_output, timestep, sample, return_dict=False, **kwargs)[0]  # advances the index
            sigmas = scheduler.sigmas
            if i not in self.sde_steps:
                return (euler,)
            # a = 0 runs the same formula: the Euler step, bit for bit in fp32
            mean, step_std, _ = flow_grpo.sde_step_mean(sample, model_output, sigmas[i], sigmas[i + 1],
                                                       float(sigmas[1]), self.noise_level)
            eps = torch.stack([torch.randn(sample.shape[1:], generator=g, dtype=torch.float32) for g in generators])
            next_latents = (mean + step_std * eps.to(mean.device)).to(euler.dtype)
            if i in self.trained_steps:  # the log-prob of what is recorded (after the cast), as training recomputes it
                record["before"].append(sample[:n_real].detach().cpu())
                record["after"].append(next_latents[:n_real].detach().cpu())
                record["log_probs"].append(flow_grpo.transition_log_prob(next_latents, mean, step_std)[:n_real].cpu())
                record["sigmas"].append(float(sigmas[i]))
                record["sigmas_next"].append(float(sigmas[i + 1]))
                self.sigma_max = float(sigmas[1])
            return (next_latents,)  # the pipeline calls with return_dict=False

        return step

    def result(self) -> dict:
        first = self.chunks[0]
        return {"before": torch.cat([torch.stack(c["before"], 1) for c in self.chunks]),
                "after": torch.cat([torch.stack(c["after"], 1) for c in self.chunks]),
                "log_probs": torch.cat([torch.stack(c["log_probs"], 1) for c in self.chunks]),
                "sigmas": torch.tensor(first["sigmas"]), "sigmas_next": torch.tensor(first["sigmas_next"]),
                "sigma_max": self.sigma_max, "steps": list(self.trained_steps), "noise_level": self.noise_level}


def sampler_sigmas(scheduler, num_inference_steps: int, height: int, width: int, vae_scale_factor: int = 8) -> torch.Tensor:
    """[num_inference_steps] fp32: the sigmas `QwenImagePipeline.__call__` steps through (its
    timesteps / 1000, the final 0 left out), computed the pipeline's way: sigmas
    linspace(1, 1/n, n), shifted by the scheduler with mu = calculate_shift(packed image tokens,
    the scheduler config's base/max seq len and shift). A copy of `scheduler` is set, not it."""
    import numpy as np
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    image_seq_len = (height // vae_scale_factor // 2) * (width // vae_scale_factor // 2)  # packed 2x2 latent tokens
    cfg = scheduler.config
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    schedule = copy.deepcopy(scheduler)
    schedule.set_timesteps(num_inference_steps, sigmas=np.linspace(1.0, 1 / num_inference_steps, num_inference_steps),
                           mu=mu)
    return (schedule.timesteps.float() / 1000).cpu()
