"""Everything that knows Qwen-Image: loading, a tiny local build, LoRA, prompt encoding, VAE
decode/encode and the training forward. The rollout (the pipeline as the sampler, its step caches
and Flow-GRPO's SDE recorder) is in qwen_image_rollout.py.

Conventions (the same everywhere in this project):
- "packed latents" are what the transformer trains on: shape [B, (H/16)*(W/16), 64], in the VAE's
  *normalised* space, z_norm = (z - latents_mean) / latents_std. The pipeline's
  `output_type="latent"` returns exactly this; rollouts keep it and never re-encode images.
- sigma in [0, 1] is the flow-matching time: x_sigma = (1 - sigma) * x0 + sigma * noise. It is what
  the transformer takes as `timestep` (it multiplies by 1000 inside).
- One resolution per batch: Qwen-Image's RoPE reads the first entry of `img_shapes` only.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from typing import TYPE_CHECKING

import torch
from PIL import Image

if TYPE_CHECKING:
    from diffusers import QwenImagePipeline

# diffusers / transformers / peft are imported inside the functions: importing this module stays
# cheap, so scripts can read its constants (LoRA targets) and validate flags before ~10 s of imports.

# The transformer modules the reference recipe puts LoRA on (VeRL-Omni Qwen-Image OCR DPO).
RECIPE_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0",
    "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2",
)
# On the tiny random model, attention-only LoRA does not move a reward in tens of steps; the MLPs
# and the output projection do (see DESIGN.md, "Learning on the tiny model").
TINY_LORA_TARGETS = (
    "to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out",
    "img_mlp.net.0.proj", "img_mlp.net.2", "proj_out",
)

# Qwen-Image's scheduler configuration (scheduler/scheduler_config.json of Qwen/Qwen-Image).
QWEN_IMAGE_SCHEDULER_CONFIG = dict(
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9,
    num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, time_shift_type="exponential",
    use_dynamic_shifting=True, invert_sigmas=False, use_beta_sigmas=False,
    use_exponential_sigmas=False, use_karras_sigmas=False,
)

# The real transformer (Qwen/Qwen-Image transformer/config.json): 20B parameters.
QWEN_IMAGE_TRANSFORMER_CONFIG = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=3584, guidance_embeds=False, axes_dims_rope=(16, 56, 56),
)

# Sizes of the locally built random model. "tiny" is for tests and the CPU demo (a 64x64 rollout of
# 8 images in well under a second); "bench" is big enough that compute dominates Python overhead.
TINY_SIZES = {
    "tiny": dict(num_layers=2, attention_head_dim=16, num_attention_heads=2, text_hidden=32,
                 text_layers=2, vae_base_dim=16),
    "bench": dict(num_layers=4, attention_head_dim=32, num_attention_heads=4, text_hidden=64,
                  text_layers=2, vae_base_dim=32),
}

# peft `init_lora_weights` values that leave the base weights untouched (B = 0: the adapter starts as a
# no-op), so "adapters disabled" is the base model, i.e. the reference, and the saved LoRA fits the
# stock base model. pissa / olora / corda / loftq rewrite the base weights and are refused.
LORA_INITS = {"gaussian": "gaussian", "default": True}  # "default": peft's kaiming-uniform A, zero B

# The system prompt diffusers wraps every prompt in; its first 34 tokens are dropped after encoding.
_TEMPLATE_PREFIX_TOKENS = 34
_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                   "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
_TOKENIZER_CORPUS = [
    'A sign that says "Open 24 hours" on a brick wall',
    "A red apple on a wooden table, photo, soft light",
    'A coffee cup with the word "Morning" printed on it',
    "A cat sitting on a windowsill at sunset, oil painting",
    'A neon sign reading "Hello World" in a dark alley',
    "Two dogs playing in the snow, high detail",
]


# ----------------------------------------------------------------------------------------------
# Loading


def tiny_transformer_config(size: str = "tiny") -> dict:
    """The tiny transformer's config (TINY_SIZES[size]): what build_tiny_pipeline builds, and what
    the LoRA checks read before any model exists."""
    s = TINY_SIZES[size]
    head_dim = s["attention_head_dim"]
    rope = (head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8)  # even, sums to head_dim
    return dict(patch_size=2, in_channels=64, out_channels=16, num_layers=s["num_layers"],
                attention_head_dim=head_dim, num_attention_heads=s["num_attention_heads"],
                joint_attention_dim=s["text_hidden"], guidance_embeds=False, axes_dims_rope=rope)


def linear_shapes(module) -> dict[str, tuple[int, int]]:
    """{name: (in_features, out_features)} of every Linear in `module` (a transformer, loaded or on
    the meta device): what a LoRA's modules and sizes must match."""
    return {name: (sub.in_features, sub.out_features) for name, sub in module.named_modules()
            if isinstance(sub, torch.nn.Linear)}


def looks_like_local_path(spec: str) -> bool:
    """A path meant as a local one: it starts with ./ ../ / ~, or its first component is a folder
    here (`worlds/text_wrold`: `worlds` exists, so this is not the Hub id of an owner `worlds`)."""
    if spec.startswith(("./", "../", "/", "~")):
        return True
    first = spec.split("/", 1)[0]
    return "/" in spec and bool(first) and os.path.isdir(first)


def load_pipeline(pretrained: str, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
                  ) -> QwenImagePipeline:
    """The pipeline for a hub id (`Qwen/Qwen-Image`), a local directory written by `save_pretrained`,
    or `tiny` / `tiny-bench` (built locally, random weights, no download). Remote code is never run."""
    from diffusers import QwenImagePipeline

    if pretrained in ("tiny", "tiny-bench"):
        pipe = build_tiny_pipeline(seed=0, size="tiny" if pretrained == "tiny" else "bench")
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        if looks_like_local_path(pretrained) and not os.path.exists(pretrained):  # not a Hub id: no download tried
            raise FileNotFoundError(2, "no such local model folder (a local path, not a Hub id)", pretrained)
        pipe = QwenImagePipeline.from_pretrained(pretrained, dtype=dtype, trust_remote_code=False)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_tiny_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # Train a byte-level BPE with Qwen2's own pre-tokenizer on a corpus that contains the pipeline's
    # prompt template, so that every word of the template prefix becomes one token and the prefix is
    # exactly the 34 tokens the pipeline drops (as with the real Qwen2.5 tokenizer).
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    # The template QwenImagePipeline.__init__ sets as `prompt_template_encode`.
    template = (
        "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
        "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
        "<|im_end|>\n<|im_start|>assistant\n")
    corpus = [template.format(p) for p in _TOKENIZER_CORPUS] * 20
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=_SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, additional_special_tokens=_SPECIAL_TOKENS[1:])
    prefix = tokenizer(template.split("{}")[0])["input_ids"]
    assert len(prefix) == _TEMPLATE_PREFIX_TOKENS, f"tiny tokenizer: template prefix is {len(prefix)} tokens"
    return tokenizer


def build_tiny_pipeline(seed: int = 0, size: str = "tiny") -> QwenImagePipeline:
    """A randomly initialised QwenImagePipeline made of the real classes, deterministic per seed.

    Same code paths as the 20B model (packing, RoPE, masks, VAE normalisation, scheduler shift); only
    the widths and depths are small. `size="bench"` gives a variant where compute dominates.
    """
    from diffusers import (AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline,
                           QwenImageTransformer2DModel)
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    s = TINY_SIZES[size]
    tokenizer = _build_tiny_tokenizer()
    text_head_dim = s["text_hidden"] // 2
    mrope = [text_head_dim // 8, 3 * text_head_dim // 16, 3 * text_head_dim // 16]  # sums to head_dim/2
    mrope[0] += text_head_dim // 2 - sum(mrope)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = QwenImageTransformer2DModel(**tiny_transformer_config(size))
        # Real latent statistics, so that the normalisation is exercised with non-trivial values.
        vae = AutoencoderKLQwenImage(base_dim=s["vae_base_dim"], z_dim=16, dim_mult=[1, 1, 1, 1],
                                     num_res_blocks=1, temperal_downsample=[False, True, True])
        text_config = Qwen2_5_VLConfig(
            text_config=dict(vocab_size=len(tokenizer), hidden_size=s["text_hidden"],
                             intermediate_size=2 * s["text_hidden"], num_hidden_layers=s["text_layers"],
                             num_attention_heads=2, num_key_value_heads=2,
                             rope_parameters=dict(rope_type="default", mrope_section=mrope, rope_theta=1e6),
                             bos_token_id=None, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
                             pad_token_id=tokenizer.pad_token_id),
            vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2,
                               out_hidden_size=s["text_hidden"], fullatt_block_indexes=[0]),
            image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            vocab_size=len(tokenizer),
        )
        text_encoder = Qwen2_5_VLForConditionalGeneration(text_config).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=vae.eval(), text_encoder=text_encoder,
                             tokenizer=tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------------------------------
# LoRA, reference, checkpointing


def dead_text_stream_modules(transformer) -> list[str]:
    """The last block's text-stream modules: their outputs never reach the image output (the model
    returns image tokens only), so LoRA on them would never get a gradient. Under DDP such
    parameters also force find_unused_parameters=True."""
    last = f"transformer_blocks.{len(transformer.transformer_blocks) - 1}"
    return [f"{last}.attn.add_q_proj", f"{last}.attn.to_add_out", f"{last}.txt_mlp.net.0.proj",
            f"{last}.txt_mlp.net.2"]


def add_lora(transformer, rank: int = 64, alpha: int = 128, target_modules=RECIPE_LORA_TARGETS,
             init: str = "gaussian"):
    """Adds one trainable LoRA adapter (base weights frozen) on `target_modules`, minus the last
    block's dead text-stream modules; returns the trainable parameters."""
    from peft import LoraConfig

    transformer.requires_grad_(False)
    dead = [m for m in dead_text_stream_modules(transformer) if any(m.endswith("." + t) for t in target_modules)]
    if init not in LORA_INITS:
        raise ValueError(f"LoRA init {init!r} is not one of {sorted(LORA_INITS)} (those leave the base weights untouched)")
    transformer.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights=LORA_INITS[init],
                                       target_modules=list(target_modules), exclude_modules=dead or None))
    params = [p for n, p in transformer.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def make_frozen_reference(transformer):
    """Full-parameter mode: the reference is a frozen copy of the initial policy."""
    reference = copy.deepcopy(transformer)
    reference.requires_grad_(False)
    return reference.eval()


@contextlib.contextmanager
def lora_disabled(transformer):
    """Runs the base model (the reference) under LoRA. peft's disable sets requires_grad=False on the
    adapters and its enable does not always restore it, so the flags are put back explicitly:
    otherwise every LoRA gradient after a reference pass is silently None."""
    flags = [(p, p.requires_grad) for p in transformer.parameters()]
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()
        for p, flag in flags:
            p.requires_grad_(flag)


def set_gradient_checkpointing(transformer, enabled: bool):
    if enabled:
        transformer.enable_gradient_checkpointing()
    else:
        transformer.disable_gradient_checkpointing()


def save_lora(transformer, output_dir: str, state_dict: dict | None = None):
    """Writes `output_dir/pytorch_lora_weights.safetensors` in the diffusers format that
    `QwenImagePipeline.load_lora_weights(output_dir)` reads. `state_dict`: the transformer's full
    state (e.g. gathered from FSDP shards); default: its own."""
    from diffusers import QwenImagePipeline
    from peft.utils import get_peft_model_state_dict

    lora = get_peft_model_state_dict(transformer, state_dict=state_dict)
    state = {k: v.detach().to("cpu").contiguous() for k, v in lora.items()}
    # The adapter config travels as metadata: without it the loader assumes alpha = rank.
    # The exact adapted modules (not suffixes + exclusions), so the loader injects what the file holds.
    metadata = transformer.peft_config["default"].to_dict()
    metadata.pop("exclude_modules", None)
    metadata["target_modules"] = sorted({k.rsplit(".lora_", 1)[0] for k in state})
    QwenImagePipeline.save_lora_weights(output_dir, transformer_lora_layers=state, safe_serialization=True,
                                        transformer_lora_adapter_metadata=metadata)


def load_lora(pipe: QwenImagePipeline, lora_dir: str, adapter_name: str = "default_0"):
    """`pipe.load_lora_weights(lora_dir)` with the LoRA weights kept in fp32 whatever the pipeline's
    dtype, as the trainer keeps them (diffusers casts them to the transformer's dtype): a bf16
    pipeline then computes exactly what the trainer's evaluation computed."""
    import os

    from safetensors.torch import load_file

    pipe.load_lora_weights(lora_dir, adapter_name=adapter_name)
    saved = load_file(os.path.join(lora_dir, "pytorch_lora_weights.safetensors"))
    loaded = 0
    for name, param in pipe.transformer.named_parameters():
        if f".{adapter_name}." in name:
            key = "transformer." + name.replace(f".{adapter_name}.", ".")
            param.data = saved[key].to(device=param.device, dtype=torch.float32)
            loaded += 1
    assert loaded == len(saved), f"{lora_dir}: {loaded} LoRA tensors placed, file holds {len(saved)}"


# ----------------------------------------------------------------------------------------------
# Prompt encoding


class PromptCache:
    """Text embeddings per distinct prompt string: each prompt hits the text encoder once.

    Embeddings are stored unpadded ([L_i, D], the pipeline's template tokens already dropped) as
    compact copies in CPU memory (pinned when CUDA is available), not on the accelerator and not as
    views of their padded encoder batch, and padded and moved per request. With `rank`/`world_size`
    each process encodes its share of the prompts and the processes exchange them. After everything
    needed is encoded, `offload_text_encoder()` moves the text encoder off the accelerator.
    """

    def __init__(self, pipe: QwenImagePipeline, max_sequence_length: int = 1024):
        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.embeds: dict[str, torch.Tensor] = {}
        self.encoder_calls = 0  # batches sent to the text encoder (tests and logs read it)
        self.pin = torch.cuda.is_available()

    def _store(self, prompt: str, embedding: torch.Tensor):
        # clone: a slice would keep its whole padded batch alive
        embedding = embedding.to("cpu").clone()
        self.embeds[prompt] = embedding.pin_memory() if self.pin else embedding

    @torch.no_grad()
    def warm(self, prompts, batch_size: int = 16, rank: int = 0, world_size: int = 1):
        """Encodes the prompts not cached yet. With world_size > 1 it is collective (every rank passes
        the same prompts): rank r encodes every world_size-th missing prompt, then all ranks gather."""
        missing = list(dict.fromkeys(p for p in prompts if p not in self.embeds))
        mine = missing[rank::world_size]
        for start in range(0, len(mine), batch_size):
            chunk = mine[start:start + batch_size]
            embeds, mask = self.pipe._get_qwen_prompt_embeds(chunk, device=self.pipe._execution_device)
            self.encoder_calls += 1
            for prompt, e, m in zip(chunk, embeds, mask):
                self._store(prompt, e[: int(m.sum())][: self.max_sequence_length])
        if world_size > 1:
            shared = [None] * world_size
            torch.distributed.all_gather_object(shared, {p: self.embeds[p] for p in mine})
            for part in shared:
                for prompt, embedding in part.items():
                    if prompt not in self.embeds:
                        self._store(prompt, embedding)

    def __call__(self, prompts, device=None, dtype=None):
        """-> (embeds [B, L, D], mask [B, L]) on `device` (default CPU), L the longest prompt."""
        self.warm(prompts)
        rows = [self.embeds[p] for p in prompts]
        length = max(r.shape[0] for r in rows)
        embeds = torch.stack([torch.cat([r, r.new_zeros(length - r.shape[0], r.shape[1])]) for r in rows])
        mask = torch.stack([torch.arange(length) < r.shape[0] for r in rows]).long()
        device = device or "cpu"
        return embeds.to(device=device, dtype=dtype or embeds.dtype), mask.to(device)

    def offload_text_encoder(self, device="cpu"):
        self.pipe.text_encoder.to(device)


# ----------------------------------------------------------------------------------------------
# Decode, encode (the rollout: qwen_image_rollout.py)


def _latent_stats(pipe, device, dtype):
    cfg = pipe.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(device, dtype)
    std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(device, dtype)
    return mean, std


@torch.no_grad()
def decode_latents(pipe: QwenImagePipeline, packed_latents: torch.Tensor, height: int, width: int,
                   batch_size: int = 16) -> list[Image.Image]:
    """Packed normalised latents [B, S, 64] -> PIL images, exactly as the pipeline decodes."""
    vae = pipe.vae
    images = []
    for start in range(0, packed_latents.shape[0], batch_size):
        z = packed_latents[start:start + batch_size].to(vae.device, vae.dtype)
        z = pipe._unpack_latents(z, height, width, pipe.vae_scale_factor)  # [b, 16, 1, H/8, W/8]
        mean, std = _latent_stats(pipe, z.device, z.dtype)
        z = z / (1.0 / std) + mean  # written as the pipeline writes it, so images match it bit for bit
        pixels = vae.decode(z, return_dict=False)[0][:, :, 0]  # [b, 3, H, W] in [-1, 1]
        images += pipe.image_processor.postprocess(pixels, output_type="pil")
    return images


@torch.no_grad()
def encode_images(pipe: QwenImagePipeline, images: list[Image.Image], height: int, width: int,
                  batch_size: int = 16) -> torch.Tensor:
    """PIL images -> packed normalised latents [B, S, 64] (float32, CPU); resized and centre-cropped
    to (height, width); the posterior mean, so the same image always gives the same latents."""
    vae = pipe.vae
    out = []
    for start in range(0, len(images), batch_size):
        pixels = pipe.image_processor.preprocess(images[start:start + batch_size], height=height, width=width,
                                                 resize_mode="crop")
        pixels = pixels.to(vae.device, vae.dtype).unsqueeze(2)  # [b, 3, 1, H, W]
        z = vae.encode(pixels).latent_dist.mode()  # [b, 16, 1, H/8, W/8]
        mean, std = _latent_stats(pipe, z.device, z.dtype)
        z = ((z - mean) / std)[:, :, 0]
        out.append(pipe._pack_latents(z, z.shape[0], z.shape[1], z.shape[2], z.shape[3]).float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# Training forward


def predict_velocity(transformer, noisy_latents: torch.Tensor, sigmas: torch.Tensor, prompt_embeds: torch.Tensor,
                     prompt_mask: torch.Tensor | None, height: int, width: int,
                     negative_prompt_embeds: torch.Tensor | None = None, negative_prompt_mask: torch.Tensor | None = None,
                     true_cfg_scale: float = 1.0) -> torch.Tensor:
    """v_theta(x_sigma, sigma, c) for packed latents [B, S, 64] at sigmas [B] in [0, 1] -> [B, S, 16*4],
    computed exactly as QwenImagePipeline's sampler computes it at that latent and sigma.

    The model takes `timestep` = sigma (it scales by 1000 inside; sigma*1000 is silently wrong), but
    rounded as the pipeline rounds it: its timestep 1000*sigma cast to the latents' dtype, then / 1000
    (in bf16 that differs from bf16(sigma) for about a quarter of sigmas). `img_shapes` describes one
    resolution for the whole batch. With `true_cfg_scale` > 1 and negative embeddings: the pipeline's
    true CFG, neg + scale * (cond - neg), rescaled to the conditional prediction's norm per token.
    """
    vae_scale = 8
    img_shapes = [[(1, height // vae_scale // 2, width // vae_scale // 2)]] * noisy_latents.shape[0]
    inner = getattr(transformer, "module", transformer)  # DDP wraps; FSDP2 shards in place
    dtype = inner.time_text_embed.timestep_embedder.linear_1.weight.dtype  # the frozen weights' dtype
    latents = noisy_latents.to(dtype)
    timestep = (sigmas.float() * 1000).to(dtype) / 1000  # the pipeline: t.to(latents.dtype), then timestep / 1000

    def forward(embeds, mask):
        if mask is not None and bool(mask.all()):
            mask = None  # the pipeline drops an all-ones mask: train on what sampling saw
        return transformer(hidden_states=latents, timestep=timestep, encoder_hidden_states=embeds.to(dtype),
                           encoder_hidden_states_mask=mask, img_shapes=img_shapes, return_dict=False)[0]

    noise_pred = forward(prompt_embeds, prompt_mask)
    if true_cfg_scale > 1.0 and negative_prompt_embeds is not None:
        # the same expressions, in the same order and dtype, as QwenImagePipeline.__call__
        neg_noise_pred = forward(negative_prompt_embeds, negative_prompt_mask)
        comb_pred = neg_noise_pred + true_cfg_scale * (noise_pred - neg_noise_pred)
        cond_norm = torch.norm(noise_pred, dim=-1, keepdim=True)
        noise_norm = torch.norm(comb_pred, dim=-1, keepdim=True)
        noise_pred = comb_pred * (cond_norm / noise_norm)
    return noise_pred
