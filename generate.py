"""Images from prompts with the base model or a trained LoRA: PNGs and a grid.

    python generate.py --pretrained Qwen/Qwen-Image --lora outputs/ocr/lora --prompt 'A sign that says "OPEN"'
    python generate.py --run_dir outputs/demo --prompts data/tiny_prompts.txt --samples_per_prompt 4
    python generate.py --run_dir outputs/demo --lora outputs/demo/checkpoint-10 --prompt "a red square" --prompt "a blue sky"

Sample j of prompt i uses seed `seed + i * 1000 + j`: with --seed 0 the images are exactly those of
evaluate.py and of the trainers' eval for the same prompts, model, LoRA and settings (the same
sampler: qwen_image_rollout.rollout). `--lora` takes an exported LoRA folder or a training checkpoint
(RUN/checkpoint-N). With `--run_dir`, the run's config.json sets the model, dtype, resolution, eval
sampling steps, CFG and the LoRA (RUN/lora); explicit flags win.

Writes OUTPUT_DIR/PROMPT-SAMPLE_seedSEED.png for each image, OUTPUT_DIR/grid.png (captioned with the
seeds) and OUTPUT_DIR/images.json (file, prompt, seed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass

import prompt_data
import run_config
import run_logs


@dataclass
class GenerateConfig:
    pretrained: str = "Qwen/Qwen-Image"  # hub id, local save_pretrained dir, or "tiny" / "tiny-bench"
    lora: str = ""  # an exported LoRA folder or a checkpoint (RUN/checkpoint-N); "" = the base model
    prompt: str = ""  # a prompt; repeat the flag for several (--prompt "a cat" --prompt "a dog")
    prompts: str = ""  # a file of prompts (.txt one per line, parquet, jsonl), after any --prompt
    max_prompts: int = 0  # 0 = all
    samples_per_prompt: int = 1  # images per prompt, seeds seed + i * 1000 + j
    seed: int = 0  # 0: the seeds of evaluate.py and the trainers' eval
    height: int = 512
    width: int = 512
    num_inference_steps: int = 50
    true_cfg_scale: float = 1.0  # > 1: classifier-free guidance with negative_prompt
    negative_prompt: str = " "
    max_sequence_length: int = 256
    chunk_size: int = 16  # images per pipeline call
    dtype: str = "auto"  # auto (bfloat16 on CUDA, float32 on CPU), bfloat16, float16 or float32
    grid_columns: int = 8
    output_dir: str = "outputs/generate"
    run_dir: str = ""  # a trainer's output_dir: its config.json sets model, dtype, resolution, steps, CFG, lora
    preset: str = ""  # no presets; see run_dir


def run_dir_defaults(run_dir: str) -> dict:
    """The run's sampling settings (as evaluate.py reads them) and its LoRA."""
    import evaluate

    fields = {f.name for f in dataclasses.fields(GenerateConfig)}
    values = evaluate.run_dir_defaults(run_dir)
    values = {k: v for k, v in values.items() if k in fields and k not in ("prompts", "max_prompts", "output_dir",
                                                                           "samples_per_prompt")}
    return values | {"lora": values.pop("lora_dir", os.path.join(run_dir, "lora"))}


def all_flag_values(argv: list[str], name: str) -> list[str]:
    """Every value of a repeated flag (argparse keeps the last one only)."""
    values = []
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            values.append(argv[i + 1])
        elif arg.startswith(f"--{name}="):
            values.append(arg.split("=", 1)[1])
    return values


def validate(config: GenerateConfig, prompts: list[str]):
    import evaluate

    run_config.require(bool(prompts) or bool(config.prompts), "prompt", "give at least one --prompt or a --prompts file")
    run_config.require(not config.prompts or run_config.data_source_exists(config.prompts), "prompts",
               f"file {config.prompts!r} does not exist")
    evaluate.require_lora_source(config.lora, "lora")
    evaluate.require_lora_fits(config.lora, config.pretrained, "lora")  # its modules and sizes, before the model loads
    run_config.require_pretrained(config.pretrained)  # a typo'd local path: one line, before any model loads
    evaluate.validate_sampling(config)  # the checks evaluate.py makes of the same flags
    run_config.require(config.grid_columns >= 1, "grid_columns", "must be >= 1")
    run_config.require(config.dtype in ("auto", "bfloat16", "float16", "float32"), "dtype",
               "must be auto, bfloat16, float16 or float32")
    run_config.require_writable_dir(config.output_dir, "output_dir")  # fail now, not after the sampling


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    run_dir = run_config.flag_value(argv, "run_dir")
    config = run_config.parse_config(GenerateConfig, {}, argv, defaults=run_dir_defaults(run_dir) if run_dir else None)
    prompts = all_flag_values(argv, "prompt")
    validate(config, prompts)
    return generate(config, prompts)


def generate(config: GenerateConfig, prompts: list[str]) -> list[dict]:
    """-> [{file, prompt, seed}] of the images written."""
    import torch

    import qwen_image as qi
    import qwen_image_rollout as qir
    from evaluate import load_lora_source, require_lora_fits

    if config.prompts:
        prompts = prompts + [row["prompt"] for row in prompt_data.load_prompts(config.prompts, split="test")]
    if config.max_prompts:
        prompts = prompts[: config.max_prompts]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = config.dtype if config.dtype != "auto" else ("bfloat16" if device == "cuda" else "float32")
    pipe = qi.load_pipeline(config.pretrained, dtype=getattr(torch, dtype), device=device)
    if config.lora:
        if run_config.known_linear_shapes(config.pretrained) is None:  # validate could not check it before loading
            require_lora_fits(config.lora, config.pretrained, "lora", qi.linear_shapes(pipe.transformer))
        load_lora_source(pipe, config.lora)
    jobs = [(i, j) for i in range(len(prompts)) for j in range(config.samples_per_prompt)]
    seeds = [config.seed + i * 1000 + j for i, j in jobs]
    settings = qir.RolloutSettings(height=config.height, width=config.width, num_inference_steps=config.num_inference_steps,
                                  true_cfg_scale=config.true_cfg_scale, negative_prompt=config.negative_prompt,
                                  chunk_size=config.chunk_size)
    _, images = qir.rollout(pipe, qi.PromptCache(pipe, config.max_sequence_length), [prompts[i] for i, _ in jobs],
                           seeds, settings)
    os.makedirs(config.output_dir, exist_ok=True)
    written = []
    for (i, j), seed, image in zip(jobs, seeds, images):
        name = f"{i:03d}-{j:02d}_seed{seed}.png"
        image.save(os.path.join(config.output_dir, name))
        written.append({"file": name, "prompt": prompts[i], "seed": seed})
    run_logs.image_grid(images, [f"seed {s}" for s in seeds], columns=config.grid_columns).save(
        os.path.join(config.output_dir, "grid.png"))
    with open(os.path.join(config.output_dir, "images.json"), "w") as f:
        json.dump(written, f, indent=1)
    print(f"{len(images)} images ({len(prompts)} prompts x {config.samples_per_prompt}) "
          f"{'with LoRA ' + config.lora if config.lora else 'from the base model'} in {config.output_dir} "
          "(grid.png, images.json)")
    return written


if __name__ == "__main__":
    run_config.cli(main)  # a config error: one line on stderr, exit status 2
