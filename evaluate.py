"""Base model vs a trained LoRA on a prompt file, same seeds: rewards as JSON and an image grid.

    python evaluate.py --run_dir outputs/demo       # a trainer's run: its config.json gives every default
    python evaluate.py --preset cpu_tiny --lora_dir outputs/demo/lora --output_dir outputs/demo/eval
    python evaluate.py --pretrained tiny --lora_dir outputs/demo/lora --prompts data/tiny_prompts.txt \\
        --reward brightness --height 64 --width 64 --num_inference_steps 4 --output_dir outputs/demo/eval
    python evaluate.py --run_dir outputs/demo --lora_dir outputs/demo/checkpoint-10   # a checkpoint, as is

With `--run_dir`, the run's config.json sets the defaults (model, dtype, eval prompts and their
count, reward, samples per prompt, eval sampling steps, resolution, CFG, sequence length, chunk
size; lora_dir = RUN_DIR/lora, output_dir = RUN_DIR/eval): the numbers reproduce the trainer's
eval rows in metrics.jsonl. Explicit flags still win.

Writes OUTPUT_DIR/eval.json ({"base": {...}, "lora": {...}, "per_prompt": [...]}) and
OUTPUT_DIR/grid.png (base on top, LoRA below, each with its reward), and prints a summary: reward
(and OCR exact match) with standard errors, base -> LoRA, the paired gain, where the files went.
`--lora_dir` takes an exported LoRA folder or a training checkpoint (RUN/checkpoint-N, read without
resuming: export_checkpoint.py). Runs under accelerate launch too: prompts are split across processes.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

import torch

import evaluation
import prompt_data
import run_config
import run_logs


@dataclass
class EvalConfig:
    pretrained: str = "Qwen/Qwen-Image"  # hub id, local save_pretrained dir, or "tiny" / "tiny-bench"
    lora_dir: str = ""  # a LoRA folder (pytorch_lora_weights.safetensors) or a checkpoint (RUN/checkpoint-N); "" = the base only
    prompts: str = "data/ocr/test.parquet"  # parquet from data_process, a directory of them, or .txt
    max_prompts: int = 0  # 0 = all
    reward: str = "ocr"  # ocr, ocr_vlm, ocr_server, jpeg_compressibility, brightness, pickscore or clipscore; or weighted: ocr:1.0,pickscore:0.2
    reward_kwargs: str = "{}"  # JSON for rewards.build_reward; keyed by component name for a weighted reward
    samples_per_prompt: int = 1  # sample j of prompt i uses seed i * 1000 + j (as the trainers' eval)
    height: int = 512  # image height in pixels, a multiple of 16
    width: int = 512  # image width in pixels, a multiple of 16
    num_inference_steps: int = 50  # sampling steps per image
    true_cfg_scale: float = 1.0  # classifier-free guidance scale (1 = off)
    negative_prompt: str = " "  # CFG's negative prompt (used when true_cfg_scale > 1)
    max_sequence_length: int = 256  # text tokens kept per prompt
    chunk_size: int = 16  # images per pipeline call
    dtype: str = "bfloat16"  # bfloat16, float16 or float32: the base weights (the LoRA is kept in fp32)
    grid_images: int = 16  # images of each variant in grid.png (base on top, LoRA below)
    output_dir: str = "outputs/eval"  # where eval.json and grid.png are written; must be writable
    run_dir: str = ""  # a trainer's output_dir: its config.json sets the defaults above (see the docstring)
    preset: str = ""  # the trainers' presets, mapped onto these fields


# trainer Config field -> EvalConfig field, for --run_dir and the presets: every eval setting of a
# trainer (evaluation.EVAL_SETTINGS), under its own name unless renamed here
RENAMED = {"eval_data": "prompts", "max_eval_prompts": "max_prompts", "eval_samples_per_prompt": "samples_per_prompt",
           "eval_inference_steps": "num_inference_steps", "rollout_chunk_size": "chunk_size"}
FROM_TRAINER = {name: RENAMED.get(name, name) for name in evaluation.EVAL_SETTINGS}


def from_trainer(values: dict) -> dict:
    """The eval settings of a trainer config (a dict: config.json or a preset)."""
    return {FROM_TRAINER[k]: v for k, v in values.items() if k in FROM_TRAINER}


PRESETS = {"cpu_tiny": from_trainer(run_config.CPU_TINY_OVERRIDES)}


def run_dir_defaults(run_dir: str) -> dict:
    path = os.path.join(run_dir, "config.json")
    run_config.require(os.path.isfile(path), "run_dir", f"{run_dir!r} has no config.json (not a trainer output_dir)")
    with open(path) as f:
        values = from_trainer(json.load(f))
    return values | {"lora_dir": os.path.join(run_dir, "lora"), "output_dir": os.path.join(run_dir, "eval")}


def validate_sampling(config):
    """The sampling flags evaluate.py, generate.py and make_offline_pairs.py share (the same field
    names in each Config): one check, one line naming the field, before any model loads."""
    from run_config import require

    require(config.max_prompts >= 0, "max_prompts", "must be >= 0 (0 = all prompts)")
    require(config.samples_per_prompt >= 1, "samples_per_prompt", "must be >= 1")
    require(config.height % 16 == 0 and config.width % 16 == 0 and config.height > 0 and config.width > 0, "height",
            "height and width must be positive multiples of 16")
    require(config.num_inference_steps >= 1, "num_inference_steps", "must be >= 1")
    require(config.true_cfg_scale >= 1.0, "true_cfg_scale", "must be >= 1 (1 disables CFG)")
    require(config.chunk_size >= 1, "chunk_size", "must be >= 1")
    require(1 <= config.max_sequence_length <= 1024, "max_sequence_length", "must be in [1, 1024]")


def require_lora_source(path: str, field: str):
    """An exported LoRA folder or a complete LoRA checkpoint ("" passes: no LoRA)."""
    from checkpoints import checkpoint_problem
    from export_checkpoint import is_checkpoint

    if not path or os.path.isfile(os.path.join(path, "pytorch_lora_weights.safetensors")):
        return
    run_config.require(is_checkpoint(path), field, f"{path!r} has neither pytorch_lora_weights.safetensors "
                       "(an exported LoRA) nor trainable.safetensors (a checkpoint)")
    problem = checkpoint_problem(path)
    run_config.require(problem is None, field, f"{path!r} is not a complete checkpoint: {problem}")


def lora_weights_file(path: str) -> str:
    """The safetensors file of an exported LoRA folder or of a checkpoint (its trainable state)."""
    from export_checkpoint import is_checkpoint

    return os.path.join(path, "trainable.safetensors" if is_checkpoint(path) else "pytorch_lora_weights.safetensors")


def lora_shapes(file: str) -> dict[str, tuple[int, int]]:
    """{module: (in_features, out_features)} of the LoRA in `file`, read from the safetensors header
    (no tensor is loaded): the exported keys `transformer.MODULE.lora_A.weight` [rank, in] and
    `.lora_B.weight` [out, rank], or a checkpoint's `MODULE.lora_A.default.weight` (the trained
    adapter; the old one, `.old.`, is left out). InputError when the file is not safetensors."""
    import re

    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as f:
            shapes = {key: f.get_slice(key).get_shape() for key in f.keys()}
    except Exception as error:  # safetensors raises its own error types for a file that is not one
        raise run_config.InputError(f"{file}: not a safetensors file ({str(error).splitlines()[0]})") from None
    modules: dict[str, list] = {}
    for key, shape in shapes.items():
        match = re.fullmatch(r"(?:transformer\.)?(.+)\.lora_([AB])(?:\.default)?\.weight", key)
        if match and len(shape) == 2:
            sizes = modules.setdefault(match.group(1), [None, None])
            if match.group(2) == "A":
                sizes[0] = shape[1]
            else:
                sizes[1] = shape[0]
    return {module: tuple(sizes) for module, sizes in modules.items()}


def lora_mismatch(file: str, linear_shapes: dict) -> str | None:
    """Why the LoRA in `file` does not fit a model whose Linears have `linear_shapes` ({name: (in,
    out)}), or None: no LoRA tensors at all, a module the model lacks, or other in/out sizes."""
    lora = lora_shapes(file)
    if not lora:
        return "it holds no LoRA tensors (keys like transformer.MODULE.lora_A.weight): not a LoRA"
    missing = sorted(module for module in lora if module not in linear_shapes)
    if missing:
        return (f"{len(missing)} of its {len(lora)} LoRA modules are not Linear layers of the model "
                f"(first: {missing[0]})")
    for module, (size_in, size_out) in sorted(lora.items()):
        model_in, model_out = linear_shapes[module]
        if (size_in, size_out) != (model_in, model_out):
            return f"{module} is {size_in} -> {size_out} in the LoRA but {model_in} -> {model_out} in the model"
    return None


def require_lora_fits(path: str, pretrained: str, field: str, linear_shapes: dict | None = None):
    """The LoRA (or checkpoint) at `path` was trained on this model: its modules and sizes, read from
    the safetensors header, against the transformer's Linears (from its config on the meta device
    before the model loads; `linear_shapes` of the loaded model when its config could not be read).
    Fails as one line naming the file and what does not match, before any sampling."""
    if not path:
        return
    if linear_shapes is None:
        linear_shapes = run_config.known_linear_shapes(pretrained)
        if linear_shapes is None:  # checked again once the model has loaded (run)
            return
    file = lora_weights_file(path)
    problem = lora_mismatch(file, linear_shapes)
    run_config.require(problem is None, field, f"{file} does not fit the model {pretrained!r}: {problem} "
                       "(a LoRA trained on another model?)")


def load_lora_source(pipe, path: str):
    """qwen_image.load_lora of an exported LoRA folder, or of a checkpoint's trained adapter (written
    to a temporary folder by export_checkpoint, then loaded through diffusers like any LoRA)."""
    import tempfile

    import qwen_image as qi
    from export_checkpoint import is_checkpoint, save_checkpoint_lora

    if not is_checkpoint(path):
        return qi.load_lora(pipe, path)
    with tempfile.TemporaryDirectory(prefix="checkpoint-lora-") as folder:
        save_checkpoint_lora(path, folder)
        qi.load_lora(pipe, folder)


def progress_prompt_cache(pipe, max_sequence_length: int, bar, negative_prompt: str | None):
    """A PromptCache that advances `bar` by each chunk of images the rollout asks embeddings for (the
    rollout asks once per chunk; with CFG once more for the negative prompt, not counted)."""
    import qwen_image as qi

    class ProgressPromptCache(qi.PromptCache):
        def __call__(self, prompts, device=None, dtype=None):
            if negative_prompt is None or any(p != negative_prompt for p in prompts):
                bar.update(min(len(prompts), bar.total - bar.n))  # the last chunk is padded to full size
            return super().__call__(prompts, device, dtype)

    return ProgressPromptCache(pipe, max_sequence_length)


def summary(results: dict, config: "EvalConfig", n_prompts: int) -> str:
    """What evaluate prints: each variant's reward (and exact match) ± standard error, the paired
    gain, where the grid and JSON went."""
    images = int(results["base"]["images"])
    lines = [f"evaluated {n_prompts} prompts x {config.samples_per_prompt} samples = {images} images "
             f"(reward {config.reward}, {config.num_inference_steps} steps, {config.height}x{config.width})"]
    for variant, label in (("base", "base"), ("lora", "LoRA")):
        if variant in results:
            row = results[variant]
            text = f"  {label:<5} reward {row['reward_mean']:.4f} ± {row['reward_se']:.2g}"
            if "exact_match" in row:
                text += f", exact match {row['exact_match']:.3f} ± {row['exact_match_se']:.2g}"
            lines.append(text)
    if "lora" in results:
        lora = {f"eval/{k}": v for k, v in results["lora"].items() if isinstance(v, float)}
        lines.append(f"  gain (LoRA - base, paired image by image): {evaluation.format_gain(lora)}")
    lines += [f"grid: {os.path.join(config.output_dir, 'grid.png')}", f"json: {os.path.join(config.output_dir, 'eval.json')}"]
    return "\n".join(lines)


def main(argv=None):
    from run_config import flag_value, parse_config, require, require_writable_dir, validate_reward

    run_dir = flag_value(list(sys.argv[1:] if argv is None else argv), "run_dir")
    config = parse_config(EvalConfig, PRESETS, argv, defaults=run_dir_defaults(run_dir) if run_dir else None)
    require(run_config.data_source_exists(config.prompts), "prompts", f"file {config.prompts!r} does not exist")
    require_lora_source(config.lora_dir, "lora_dir")
    require_lora_fits(config.lora_dir, config.pretrained, "lora_dir")  # not after the base model's sampling
    run_config.require_pretrained(config.pretrained)  # a typo'd local path: one line, before any model loads
    validate_reward(config.reward, config.reward_kwargs)
    validate_sampling(config)
    require(config.grid_images >= 0, "grid_images", "must be >= 0")
    require(config.dtype in ("bfloat16", "float16", "float32"), "dtype", "must be bfloat16, float16 or float32")
    require_writable_dir(config.output_dir, "output_dir")  # fail now, not after all the sampling
    return run(config)


def run(config: EvalConfig) -> dict:
    import math

    from accelerate import Accelerator
    from tqdm.auto import tqdm

    import qwen_image as qi
    import qwen_image_rollout as qir
    from rewards import OCR_REWARDS, build_reward, uses_ocr_target

    accelerator = Accelerator()
    is_ocr = config.reward in OCR_REWARDS
    rows = prompt_data.load_prompts(config.prompts, need_ocr_target=uses_ocr_target(config.reward), split="test")
    if config.max_prompts:
        rows = rows[: config.max_prompts]
    reward_fn = build_reward(config.reward, **json.loads(config.reward_kwargs))
    pipe = qi.load_pipeline(config.pretrained, dtype=getattr(torch, config.dtype), device=accelerator.device)
    if run_config.known_linear_shapes(config.pretrained) is None:  # main could not check it before loading
        require_lora_fits(config.lora_dir, config.pretrained, "lora_dir", qi.linear_shapes(pipe.transformer))
    per_rank = math.ceil(len(rows) * config.samples_per_prompt / accelerator.num_processes)
    bar = tqdm(total=per_rank, unit="image", disable=not accelerator.is_local_main_process)
    cache = progress_prompt_cache(pipe, config.max_sequence_length, bar,
                                  config.negative_prompt if config.true_cfg_scale > 1 else None)
    settings = qir.RolloutSettings(height=config.height, width=config.width, num_inference_steps=config.num_inference_steps,
                                  true_cfg_scale=config.true_cfg_scale, negative_prompt=config.negative_prompt,
                                  chunk_size=config.chunk_size)

    results, grids = {}, {}
    variants = ["base"] + (["lora"] if config.lora_dir else [])
    for variant in variants:
        bar.reset(total=per_rank)
        bar.set_description(f"sampling {variant}")
        if variant == "lora":
            load_lora_source(pipe, config.lora_dir)  # LoRA kept in fp32, as the trainer keeps it
        metrics, images, scores = evaluation.evaluate(pipe, cache, rows, reward_fn, settings, config.samples_per_prompt,
                                                      accelerator, exact_match=is_ocr)
        all_scores = metrics.pop("eval/rewards")  # every rank's, in (prompt, seed) order
        if variant == "lora":
            metrics.update(evaluation.paired_gain(all_scores, results["base"]["scores"], exact_match=is_ocr))
        results[variant] = {k.removeprefix("eval/"): v for k, v in metrics.items()} | {"scores": all_scores}
        grids[variant] = (images[: config.grid_images], scores[: config.grid_images])

    if accelerator.is_main_process:
        os.makedirs(config.output_dir, exist_ok=True)
        jobs = [(i, j) for i in range(len(rows)) for j in range(config.samples_per_prompt)]
        results["per_prompt"] = [
            {"prompt": rows[i]["prompt"], "seed": i * 1000 + j, **{v: results[v]["scores"][k] for v in variants}}
            for k, (i, j) in enumerate(jobs)]
        if "lora" in results:
            results["reward_gain"] = results["lora"]["reward_mean"] - results["base"]["reward_mean"]
        with open(os.path.join(config.output_dir, "eval.json"), "w") as f:
            json.dump(results, f, indent=1)
        if "lora" in grids:
            run_logs.pair_grid(grids["lora"][0], grids["base"][0], grids["lora"][1], grids["base"][1],
                               labels=("LoRA", "base")).save(os.path.join(config.output_dir, "grid.png"))
        else:
            run_logs.image_grid(grids["base"][0], [f"{s:.3f}" for s in grids["base"][1]]).save(
                os.path.join(config.output_dir, "grid.png"))
    bar.close()
    if accelerator.is_main_process:
        print(summary(results, config, len(rows)))
    return results


if __name__ == "__main__":
    run_config.cli(main)  # a config or data error: one line on stderr, exit status 2
