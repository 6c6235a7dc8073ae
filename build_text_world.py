"""Build the tiny text-rendering world: a small Qwen-Image (the real diffusers classes) whose VAE and
transformer are briefly pretrained on CPU on synthetic renders of short capital words, so that the
PP-OCRv5 reward reads some of its samples, and online DPO has room to improve it.

    python build_text_world.py                                # writes worlds/text_world and data/text_world

Stages (one script, in order):
  1. vocabulary and prompts: 3-letter capital words, train words / held-out words, Flow-GRPO-style
     prompts (`A poster with the word "CAT" on it`), written to data/text_world/*.txt;
  2. the VAE (AutoencoderKLQwenImage, tiny): trained as a real autoencoder on random renders of
     random 3-letter strings (MSE + image-gradient L1, which keeps glyph edges sharp);
  3. latent statistics: per-channel mean/std of the posterior means of a fixed render set, stored in
     the VAE config (latents_mean / latents_std) as Qwen-Image's pipeline expects;
  4. the transformer (QwenImageTransformer2DModel, tiny): flow matching on the normalised packed
     latents of that render set, conditioned on the tiny text encoder's embeddings of the prompts,
     with the project's own helpers (PromptCache, encode_images, predict_velocity, noisy_latents),
     so its convention is exactly the trainers'; stopped early on purpose (a mediocre renderer);
  5. save_pretrained of the whole QwenImagePipeline (safetensors) plus world_info.json with the
     measured figures (reconstruction OCR, eval OCR of samples).

Deterministic given the same torch version and thread count (`threads`): every random draw comes
from seeded generators. Fonts: DejaVu (system-installed); Pillow's scalable default font otherwise.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import asdict, dataclass

import torch
from PIL import Image, ImageDraw, ImageFont

import evaluation
import qwen_image as qi
import qwen_image_rollout as qir

ROOT = os.path.dirname(os.path.abspath(__file__))

# 3-letter capital words; the first `train_words` are trained on, the rest are held out.
WORDS = (
    "CAT DOG SUN BOX CAR HAT CUP PEN BUS FOX OWL BEE KEY TOY ICE JAM "
    "MAP BED EGG ZOO RUN SKY TEA VAN "
    "LOG NET POT RAY WAX GYM ARM FIG"
).split()
TEMPLATES = (
    'A poster with the word "{}" on it',
    'A sign that says "{}"',
    'The word "{}" in bold letters',
    'A label reading "{}"',
)
FONT_FILES = ("DejaVuSans-Bold.ttf", "DejaVuSerif-Bold.ttf")
FONT_DIRS = ("/usr/share/fonts/truetype/dejavu", "/usr/share/fonts/dejavu", "/usr/share/fonts/TTF")
BACKGROUNDS = ((255, 255, 255), (250, 240, 205), (215, 232, 250))  # white, cream, pale blue
INKS = ((0, 0, 0), (150, 20, 20), (20, 40, 140))  # black, dark red, dark blue


@dataclass
class BuildConfig:
    output_dir: str = "worlds/text_world"  # the pipeline directory (--pretrained DIR)
    prompts_dir: str = "data/text_world"  # train.txt, eval.txt, eval_heldout_words.txt
    seed: int = 0
    threads: int = 1  # torch intra-op threads; results are reproducible for a fixed count (2 threads
    # on 2 busy cores were ~10x slower than 1: OpenMP threads wait for each other)
    height: int = 32
    width: int = 64
    train_words: int = 24  # the rest of WORDS are held out
    eval_samples_per_prompt: int = 4  # for the build's own OCR figures (seeds i*1000+j, as the trainers)
    sample_steps: int = 8  # pipeline inference steps for the build's eval
    # VAE
    vae_base_dim: int = 16
    vae_dim_mult: str = "1,2,2,4"
    vae_steps: int = 1200
    vae_batch_size: int = 8
    vae_lr: float = 3e-3
    vae_grad_loss_weight: float = 0.5  # weight of the image-gradient L1 (sharp glyph edges)
    vae_latent_l2_weight: float = 1e-4  # keeps the code's scale bounded (there is no KL: no sampling)
    vae_from: str = ""  # reuse the VAE (with its latent statistics) of an earlier build; skips stages 2-3
    # transformer
    layers: int = 4
    heads: int = 4
    head_dim: int = 32
    renders_per_word: int = 48  # fixed render set the transformer learns (latents computed once)
    # the transformer's renders: one font, black on white, centred (+-2 px). The VAE learns every
    # variation; a tiny transformer learns one style in minutes, several only blurrily.
    plain_renders: bool = True
    dit_steps: int = 3000  # at most; see dit_stop_exact_match
    dit_batch_size: int = 32
    dit_lr: float = 2e-3
    dit_eval_every: int = 250
    # a mediocre renderer on purpose: stop at the first eval whose OCR exact match reaches this
    dit_stop_exact_match: float = 0.25


# ----------------------------------------------------------------------------------------------
# Stage 1: words, prompts, renders


def load_fonts(height: int) -> list:
    """[(font_name, size, ImageFont)]: DejaVu if installed, else Pillow's scalable default; glyphs
    53-66 % of the image height (large glyphs: easier to reconstruct and to read)."""
    sizes = sorted({round(height * f) for f in (0.53, 0.57, 0.61, 0.66)})
    fonts = []
    for name in FONT_FILES:
        path = next((os.path.join(d, name) for d in FONT_DIRS if os.path.exists(os.path.join(d, name))), None)
        for size in sizes:
            fonts.append((name, size, ImageFont.truetype(path, size) if path else ImageFont.load_default(size=size)))
    return fonts


def render(text: str, rng: random.Random, fonts, height: int, width: int, plain: bool = False) -> Image.Image:
    """`text` in one of the fonts/sizes, ink and background colours, at a random position that fits;
    `plain`: the first font, black on white, centred within +-2 pixels."""
    _, _, font = fonts[len(fonts) // 8 * 2] if plain else rng.choice(fonts)
    background, ink = (BACKGROUNDS[0], INKS[0]) if plain else (rng.choice(BACKGROUNDS), rng.choice(INKS))
    image = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    margin = max(2, height // 16)
    slack_x, slack_y = max(0, width - (right - left) - 2 * margin), max(0, height - (bottom - top) - 2 * margin)
    if plain:
        x = margin - left + slack_x // 2 + rng.randint(-2, 2)
        y = margin - top + slack_y // 2 + rng.randint(-1, 1)
    else:
        x = margin - left + rng.randint(0, slack_x)
        y = margin - top + rng.randint(0, slack_y)
    draw.text((x, y), text, font=font, fill=ink)
    return image


def write_prompts(config: BuildConfig) -> dict[str, list[str]]:
    """train.txt: every template x train word; eval.txt: one prompt per train word (templates in
    turn; held-out seeds); eval_heldout_words.txt: the same for the held-out words."""
    train_words, heldout = WORDS[: config.train_words], WORDS[config.train_words:]
    files = {
        "train": [t.format(w) for w in train_words for t in TEMPLATES],
        "eval": [TEMPLATES[i % len(TEMPLATES)].format(w) for i, w in enumerate(train_words)],
        "eval_heldout_words": [TEMPLATES[i % len(TEMPLATES)].format(w) for i, w in enumerate(heldout)],
    }
    os.makedirs(config.prompts_dir, exist_ok=True)
    for name, prompts in files.items():
        with open(os.path.join(config.prompts_dir, f"{name}.txt"), "w") as f:
            f.write("\n".join(prompts) + "\n")
    return files


# ----------------------------------------------------------------------------------------------
# Stage 2-3: the VAE


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL -> [B, 3, 1, H, W] in [-1, 1] (the VAE's video layout, one frame)."""
    import numpy as np

    array = torch.from_numpy(np.stack([np.asarray(im, dtype="float32") for im in images]))
    return (array / 127.5 - 1.0).permute(0, 3, 1, 2).unsqueeze(2)


def image_gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x.diff(dim=-1) - y.diff(dim=-1)).abs().mean() + (x.diff(dim=-2) - y.diff(dim=-2)).abs().mean())


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """vae.decode for one frame without its final clamp to [-1, 1]: through the clamp, pixels that
    overshoot get no gradient, and a decoder that overshoots everywhere never recovers."""
    vae.clear_cache()
    vae._conv_idx = [0]
    out = vae.decoder(vae.post_quant_conv(z), feat_cache=vae._feat_map, feat_idx=vae._conv_idx)
    vae.clear_cache()
    return out


def train_vae(config: BuildConfig, fonts, log):
    from diffusers import AutoencoderKLQwenImage
    from diffusers.optimization import get_cosine_schedule_with_warmup

    torch.manual_seed(config.seed)
    vae = AutoencoderKLQwenImage(base_dim=config.vae_base_dim, z_dim=16,
                                 dim_mult=[int(m) for m in config.vae_dim_mult.split(",")],
                                 num_res_blocks=1, temperal_downsample=[False, True, True])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, 20, config.vae_steps)
    rng = random.Random(config.seed + 1)
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
    start = time.time()
    for step in range(config.vae_steps):
        # random 3-letter strings: every glyph in every slot, not only the vocabulary
        texts = ["".join(rng.choice(letters) for _ in range(3)) for _ in range(config.vae_batch_size)]
        x = to_pixels([render(t, rng, fonts, config.height, config.width) for t in texts])
        # the posterior mean: a plain autoencoder (sampling with the initial unit variance drowns
        # the code, and the decoder then learns the mean image); rollouts only ever decode means too
        posterior = vae.encode(x).latent_dist
        y = decode_unclamped(vae, posterior.mode())
        # MSE, not L1: under L1 the per-pixel optimum is the median, i.e. the background, and the
        # decoder sits on a blank image for hundreds of steps; the gradient term sharpens edges
        l1 = (y - x).abs().mean()
        loss = ((y - x) ** 2).mean() + config.vae_grad_loss_weight * image_gradient_l1(y, x) \
            + config.vae_latent_l2_weight * posterior.mean.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == config.vae_steps - 1:
            log(f"vae step {step}: l1 {l1.item():.4f} loss {loss.item():.4f} ({time.time() - start:.0f} s)")
    return vae.eval()


@torch.no_grad()
def set_latent_statistics(vae, images: list[Image.Image], batch_size: int = 32):
    """Per-channel mean/std of the posterior means -> vae.config.latents_mean / latents_std."""
    z = torch.cat([vae.encode(to_pixels(images[i:i + batch_size])).latent_dist.mode()
                   for i in range(0, len(images), batch_size)])  # [N, 16, 1, h, w]
    mean = z.mean(dim=(0, 2, 3, 4))
    std = z.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=[round(v, 5) for v in mean.tolist()],
                           latents_std=[round(v, 5) for v in std.tolist()])


# ----------------------------------------------------------------------------------------------
# Stage 4: the transformer


def make_transformer(config: BuildConfig, text_hidden: int):
    from diffusers import QwenImageTransformer2DModel

    d = config.head_dim
    torch.manual_seed(config.seed + 2)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=config.layers, attention_head_dim=d,
        num_attention_heads=config.heads, joint_attention_dim=text_hidden, guidance_embeds=False,
        axes_dims_rope=(d // 4, 3 * d // 8, 3 * d // 8))


def ocr_eval(pipe, prompt_cache, prompts, reward_fn, config: BuildConfig) -> dict:
    """The trainers' eval convention: sample j of prompt i has seed i*1000+j; exact = reward 1.0."""
    settings = qir.RolloutSettings(height=config.height, width=config.width, num_inference_steps=config.sample_steps,
                                  chunk_size=32)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(config.eval_samples_per_prompt)]
    flat = [prompts[i] for i, _ in jobs]
    _, images = qir.rollout(pipe, prompt_cache, flat, [i * 1000 + j for i, j in jobs], settings)
    scores = torch.tensor(reward_fn(images, flat), dtype=torch.float64)
    exact = evaluation.exact_matches(scores)
    return {"exact_match": exact.mean().item(), "exact_match_sem": evaluation.standard_error(exact),
            "reward_mean": scores.mean().item(), "reward_sem": evaluation.standard_error(scores),
            "images": len(scores)}, images


def train_transformer(config: BuildConfig, pipe, prompt_cache, latents, prompts, eval_prompts, reward_fn, log):
    """Flow matching on normalised packed latents [N, S, 64] with their prompts."""
    from dpo_loss import noisy_latents, velocity_target

    transformer = pipe.transformer
    transformer.train()
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.dit_lr, weight_decay=0.0)
    from diffusers.optimization import get_constant_schedule_with_warmup

    schedule = get_constant_schedule_with_warmup(optimizer, 50)
    generator = torch.Generator().manual_seed(config.seed + 3)
    history, start = [], time.time()
    for step in range(config.dit_steps):
        idx = torch.randint(0, latents.shape[0], (config.dit_batch_size,), generator=generator)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=generator)
        sigmas = torch.rand(config.dit_batch_size, generator=generator)
        embeds, mask = prompt_cache([prompts[i] for i in idx.tolist()])
        pred = qi.predict_velocity(transformer, noisy_latents(x0, noise, sigmas), sigmas, embeds, mask,
                                   config.height, config.width)
        loss = (pred - velocity_target(x0, noise)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(transformer.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 100 == 0:
            log(f"transformer step {step}: loss {loss.item():.4f} ({time.time() - start:.0f} s)")
        if (step + 1) % config.dit_eval_every == 0 or step == config.dit_steps - 1:
            transformer.eval()
            metrics, _ = ocr_eval(pipe, prompt_cache, eval_prompts, reward_fn, config)
            transformer.train()
            history.append({"step": step + 1, **metrics})
            log(f"transformer step {step + 1}: eval {json.dumps(metrics)}")
            if metrics["exact_match"] >= config.dit_stop_exact_match:
                break
    return transformer.eval(), history


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline

    from rewards import build_reward
    from run_config import parse_config

    config = parse_config(BuildConfig, {}, argv)
    torch.set_num_threads(config.threads)
    t_start = time.time()

    def log(message):
        print(f"[{time.time() - t_start:6.0f} s] {message}", flush=True)

    fonts = load_fonts(config.height)
    files = write_prompts(config)
    reward_fn = build_reward("ocr")

    # 2-3. VAE and its latent statistics
    train_words = WORDS[: config.train_words]
    render_prompts = [TEMPLATES[k % len(TEMPLATES)].format(w) for w in train_words for k in range(config.renders_per_word)]
    if config.vae_from:
        vae = AutoencoderKLQwenImage.from_pretrained(config.vae_from, subfolder="vae").eval()
    else:
        vae = train_vae(config, fonts, log)
        # statistics over every style the VAE knows (the varied renders of the train words)
        stats_rng = random.Random(config.seed)
        set_latent_statistics(vae, [render(ocr_word(p), stats_rng, fonts, config.height, config.width)
                                    for p in render_prompts])
        vae.save_pretrained(os.path.join(config.output_dir, "vae"))  # early: `vae_from` can reuse it
    t_vae = time.time() - t_start

    # reconstruction check: OCR on decode(encode(x)) of held-out renders of every word
    check_rng = random.Random(config.seed + 10)
    check_prompts = [TEMPLATES[0].format(w) for w in WORDS for _ in range(2)]
    check = [render(ocr_word(p), check_rng, fonts, config.height, config.width) for p in check_prompts]

    # the pipeline: the project's tiny tokenizer and text encoder, this VAE, a new transformer
    base = qi.build_tiny_pipeline(seed=config.seed, size="tiny")
    transformer = make_transformer(config, base.text_encoder.config.text_config.hidden_size)
    pipe = QwenImagePipeline(scheduler=base.scheduler, vae=vae, text_encoder=base.text_encoder,
                             tokenizer=base.tokenizer, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    recon = qi.decode_latents(pipe, qi.encode_images(pipe, check, config.height, config.width),
                              config.height, config.width)
    recon_scores = torch.tensor(reward_fn(recon, check_prompts), dtype=torch.float64)
    recon_metrics = {"exact_match": evaluation.exact_matches(recon_scores).mean().item(),
                     "reward_mean": recon_scores.mean().item(), "images": len(check)}
    log(f"VAE reconstructions: {json.dumps(recon_metrics)}")

    # 4. transformer: flow matching on a fixed render set of the train words
    render_rng = random.Random(config.seed)
    renders = [render(ocr_word(p), render_rng, fonts, config.height, config.width, plain=config.plain_renders)
               for p in render_prompts]
    latents = qi.encode_images(pipe, renders, config.height, config.width)  # [N, S, 64], normalised
    prompt_cache = qi.PromptCache(pipe, 64)
    prompt_cache.warm(render_prompts + files["eval"] + files["eval_heldout_words"])
    transformer, history = train_transformer(config, pipe, prompt_cache, latents, render_prompts, files["eval"],
                                             reward_fn, log)
    heldout, _ = ocr_eval(pipe, prompt_cache, files["eval_heldout_words"], reward_fn, config)
    log(f"held-out words: {json.dumps(heldout)}")

    # 5. save
    pipe.save_pretrained(config.output_dir, safe_serialization=True)
    info = {"config": asdict(config), "vae_reconstruction": recon_metrics, "transformer_evals": history,
            "heldout_words_eval": heldout, "build_seconds": round(time.time() - t_start),
            "vae_seconds": round(t_vae), "torch": torch.__version__}
    with open(os.path.join(config.output_dir, "world_info.json"), "w") as f:
        json.dump(info, f, indent=1)
    log(f"saved {config.output_dir}")
    return info


def ocr_word(prompt: str) -> str:
    from rewards import ocr_target

    return ocr_target(prompt)


if __name__ == "__main__":
    main()
