"""What both training scripts (and evaluate.py) share: config parsing with presets, prompt data, the
per-step data stream, the accelerator, the policy and its DPO update (`DPOPolicy`), atomic
checkpoints, metric logging, sample grids, evaluation, and a clean stop on SIGTERM.
The scripts keep what differs: where the (chosen, rejected) latents come from.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile

import torch
from PIL import Image, ImageDraw

import qwen_image  # cheap: it imports diffusers inside its functions

# ----------------------------------------------------------------------------------------------
# Config

TINY_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_prompts.txt")
# What both trainers' `cpu_tiny` presets share: the tiny random Qwen-Image on a CPU with a reward it
# can learn (DESIGN.md's recipe: LoRA on attention, the image MLP and proj_out; lr 3e-2).
CPU_TINY_OVERRIDES = dict(
    pretrained="tiny", dtype="float32", lora_rank=8, lora_alpha=8, gradient_checkpointing=False,
    lora_targets=",".join(qwen_image.TINY_LORA_TARGETS),
    eval_data=TINY_PROMPTS, height=64, width=64, max_sequence_length=64, eval_inference_steps=4,
    eval_samples_per_prompt=4, rollout_chunk_size=32, reward="brightness", learning_rate=3e-2, log_with="none",
)

# The shipped text-rendering world (build_text_world.py): a tiny Qwen-Image pretrained to draw
# 3-letter capital words at 32x64, scored by the real PP-OCRv5 reward. What the trainers' and
# make_offline_pairs' `text_world` presets share.
ROOT = os.path.dirname(os.path.abspath(__file__))
TEXT_WORLD = os.path.join(ROOT, "worlds", "text_world")
TEXT_WORLD_DATA = os.path.join(ROOT, "data", "text_world")
TEXT_WORLD_OVERRIDES = dict(
    pretrained=TEXT_WORLD, dtype="float32", gradient_checkpointing=False,
    eval_data=os.path.join(TEXT_WORLD_DATA, "eval.txt"),
    height=32, width=64, max_sequence_length=64, eval_inference_steps=8,
    eval_samples_per_prompt=4, rollout_chunk_size=32, reward="ocr", log_with="none",
    lora_rank=8, lora_alpha=8, lora_targets=",".join(qwen_image.TINY_LORA_TARGETS),
)


def parse_config(config_cls, presets: dict[str, dict], argv: list[str] | None = None):
    """Every dataclass field is a CLI flag (transformers' HfArgumentParser). `--preset NAME` applies
    a named group of overrides first; flags given explicitly win over the preset."""
    from transformers import HfArgumentParser

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(config_cls)
    preset = _flag_value(argv, "preset")
    if preset:
        if preset not in presets:
            raise ValueError(f"preset: unknown preset {preset!r}; known: {', '.join(presets) or 'none'}")
        parser.set_defaults(**presets[preset])
    (config,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return config


def _flag_value(argv, name):
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def require(condition: bool, field: str, rule: str):
    """Config validation: raise ValueError naming the field and the rule it breaks."""
    if not condition:
        raise ValueError(f"config field `{field}`: {rule}")


def validate_policy_config(config, world_size: int = 1):
    """The rules both trainers share: model, LoRA, DPO, optimiser, evaluation, logging."""
    from pairing import PAIR_STRATEGIES, SIGMA_SCHEMES
    from rewards import REWARDS

    require(config.micro_batch_pairs >= 1, "micro_batch_pairs",
            "must be >= 1: a micro-batch holds whole (chosen, rejected) pairs, never half of one")
    require(math.isfinite(config.beta) and config.beta > 0, "beta", "must be a finite number > 0")
    require(config.reward in REWARDS, "reward", f"unknown reward {config.reward!r}; known: {', '.join(REWARDS)}")
    require(getattr(config, "pair_strategy", PAIR_STRATEGIES[0]) in PAIR_STRATEGIES, "pair_strategy",
            f"must be one of {PAIR_STRATEGIES}")
    require(config.sigma_scheme in SIGMA_SCHEMES, "sigma_scheme", f"must be one of {SIGMA_SCHEMES}")
    require(getattr(config, "min_reward_margin", 0.0) >= 0, "min_reward_margin", "must be >= 0")
    require(config.train_mode in ("lora", "full"), "train_mode", "must be 'lora' or 'full'")
    require(config.sharding in ("none", "fsdp2"), "sharding", "must be 'none' or 'fsdp2'")
    require(config.dtype in ("bfloat16", "float32", "float16"), "dtype", "must be bfloat16, float16 or float32")
    require(config.height % 16 == 0 and config.height > 0, "height", "must be a positive multiple of 16")
    require(config.width % 16 == 0 and config.width > 0, "width", "must be a positive multiple of 16")
    require(config.eval_inference_steps >= 1, "eval_inference_steps", "must be >= 1")
    require(1 <= config.max_sequence_length <= 1024, "max_sequence_length", "must be in [1, 1024]")
    require(config.true_cfg_scale >= 1.0, "true_cfg_scale", "must be >= 1 (1 disables CFG)")
    require(config.lora_rank >= 1 and config.lora_alpha > 0, "lora_rank", "rank must be >= 1 and alpha > 0")
    require(bool(config.lora_targets.strip()) or config.train_mode == "full", "lora_targets", "must name modules")
    require(config.learning_rate > 0, "learning_rate", "must be > 0")
    require(config.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    require(config.max_steps >= 1, "max_steps", "must be >= 1")
    require(config.max_nonfinite_in_a_row >= 1, "max_nonfinite_in_a_row", "must be >= 1")
    for field in ("eval_every", "checkpoint_every", "checkpoints_total_limit", "max_eval_prompts", "lr_warmup_steps"):
        require(getattr(config, field) >= 0, field, "must be >= 0 (0 disables)")
    require(config.eval_samples_per_prompt >= 1, "eval_samples_per_prompt", "must be >= 1")
    require(config.log_with in ("wandb", "tensorboard", "none"), "log_with", "must be wandb, tensorboard or none")
    try:
        json.loads(config.reward_kwargs)
    except json.JSONDecodeError as error:
        raise ValueError(f"config field `reward_kwargs`: not valid JSON ({error})") from None
    require(os.path.exists(config.eval_data), "eval_data", f"file {config.eval_data!r} does not exist")


def config_dict(config) -> dict:
    return dataclasses.asdict(config)


# ----------------------------------------------------------------------------------------------
# Prompt data

def load_prompts(path: str, need_ocr_target: bool = False) -> list[dict]:
    """Rows {prompt, ground_truth, uid} from a data_process/qwenimage_ocr.py parquet, a
    directory of such parquet files, or a text file with one prompt per line (blank lines skipped).
    With need_ocr_target, every prompt must carry a quoted OCR target (error names file and row)."""
    from rewards import ocr_target

    if not os.path.exists(path):
        raise FileNotFoundError(f"prompt data {path!r} does not exist")
    rows = []
    if os.path.isdir(path) or path.endswith(".parquet"):
        import pyarrow.parquet as pq

        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet")) \
            if os.path.isdir(path) else [path]
        if not files:
            raise FileNotFoundError(f"no .parquet files in {path!r}")
        for file in files:
            table = pq.read_table(file)
            if "prompt" not in table.column_names:
                raise ValueError(f"{file}: missing column 'prompt' (has {table.column_names})")
            prompts = table.column("prompt").to_pylist()
            truths = table.column("ground_truth").to_pylist() if "ground_truth" in table.column_names else [None] * len(prompts)
            for i, (prompt, truth) in enumerate(zip(prompts, truths)):
                if not isinstance(prompt, str) or not prompt.strip():
                    raise ValueError(f"{file}: row {i}: empty or non-string prompt")
                rows.append({"prompt": prompt, "ground_truth": truth, "uid": f"{os.path.basename(file)}:{i}"})
    else:
        with open(path, encoding="utf-8") as f:
            for line_number, line in enumerate(f, 1):
                if line.strip():
                    rows.append({"prompt": line.strip(), "ground_truth": None, "uid": f"{os.path.basename(path)}:{line_number}"})
    if not rows:
        raise ValueError(f"{path}: no prompts")
    if need_ocr_target:
        for row in rows:
            target = ocr_target(row["prompt"])
            if target is None:
                raise ValueError(f"{row['uid']}: prompt has no quoted text for the OCR reward: {row['prompt']!r}")
            row["ground_truth"] = row["ground_truth"] if row["ground_truth"] is not None else target
    return rows


def prompts_for_step(rows: list[dict], step: int, prompts_per_step: int, rank: int, world_size: int,
                     seed: int) -> list[dict]:
    """This rank's prompts for a global step: an endless stream of per-epoch permutations (seeded by
    seed and epoch), cut into steps of prompts_per_step and then into equal per-rank slices. A pure
    function of the step: resuming needs nothing but the step number."""
    per_rank = prompts_per_step // world_size
    start = step * prompts_per_step + rank * per_rank
    out = []
    for position in range(start, start + per_rank):
        epoch, offset = divmod(position, len(rows))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(rows[int(order[offset])])
    return out


def derived_seed(*parts: int) -> int:
    """A 63-bit seed from integers (step, rank, ...): independent streams without stored RNG state."""
    value = 0x9E3779B97F4A7C15
    for part in parts:
        value = (value ^ (int(part) + 0x9E3779B97F4A7C15 + (value << 6) + (value >> 2))) & (2**63 - 1)
    return value


# ----------------------------------------------------------------------------------------------
# Checkpoints: full (unsharded) state dicts through torch.distributed.checkpoint, which handles a
# plain module, DDP and FSDP2 alike; written to a temporary directory and renamed into place.

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def trainable_state(model, optimizer):
    """(model state of trainable parameters, optimizer state), full tensors on CPU. Collective:
    every rank calls it."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
    trainable = {name for name, p in _named_params(model) if p.requires_grad}
    return {k: v for k, v in model_state.items() if k in trainable}, optim_state


def _named_params(model):
    inner = getattr(model, "module", model)
    return inner.named_parameters()


def save_checkpoint(output_dir: str, step: int, model, optimizer, lr_scheduler, train_state: dict,
                    is_main: bool, limit: int | None = None, extra_writer=None) -> str | None:
    """Writes output_dir/checkpoint-STEP atomically (all ranks call it; rank 0 writes)."""
    model_state, optim_state = trainable_state(model, optimizer)
    if not is_main:
        return None
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=output_dir)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model_state.items()}, os.path.join(tmp, "trainable.safetensors"))
    torch.save({"optimizer": optim_state, "lr_scheduler": lr_scheduler.state_dict()}, os.path.join(tmp, "optimizer.pt"))
    with open(os.path.join(tmp, "train_state.json"), "w") as f:
        json.dump({**train_state, "step": step}, f, indent=1)
    if extra_writer is not None:
        extra_writer(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    if limit:
        for old in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def resolve_checkpoint(spec: str, output_dir: str) -> str | None:
    if not spec:
        return None
    if spec == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.isfile(os.path.join(spec, "train_state.json")):
        raise FileNotFoundError(f"resume_from_checkpoint: {spec!r} is not a checkpoint directory")
    return spec


def load_checkpoint(path: str, model, optimizer, lr_scheduler) -> dict:
    """Restores trainable weights, optimizer and scheduler; returns train_state (with `step`)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict

    model_state = load_file(os.path.join(path, "trainable.safetensors"))
    saved = torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=saved["optimizer"],
                   options=_options(strict=False))
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    with open(os.path.join(path, "train_state.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
    """metrics.jsonl (one object per logged step, rank 0) plus accelerate's trackers."""

    def __init__(self, accelerator, output_dir: str, resume_step: int | None = None):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if accelerator.is_main_process and resume_step is not None and os.path.exists(self.path):
            # drop rows logged after the checkpoint we resume from: they will be logged again
            with open(self.path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
            with open(self.path, "w") as f:
                f.writelines(kept)

    def log(self, metrics: dict, step: int):
        if self.accelerator.is_main_process:
            row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        # trackers get the numbers; lists (prompt ids, per-rank checksums) stay in metrics.jsonl
        self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


def setup_trackers(accelerator, log_with: str, project: str, config: dict, output_dir: str):
    """wandb runs offline when no API key is configured; tensorboard writes under output_dir."""
    if log_with == "none":
        return
    if log_with == "wandb" and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_DIR", output_dir)
    accelerator.init_trackers(project, config={k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})


def pair_grid(chosen: list[Image.Image], rejected: list[Image.Image], chosen_rewards, rejected_rewards,
              tile: int = 128, labels=("W", "L")) -> Image.Image:
    """Two rows: chosen on top, rejected below, each tile captioned with its label and reward."""
    n = len(chosen)
    grid = Image.new("RGB", (tile * n, 2 * (tile + 14)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        for row, (images, scores) in enumerate(((chosen, chosen_rewards), (rejected, rejected_rewards))):
            y = row * (tile + 14)
            grid.paste(images[i].convert("RGB").resize((tile, tile)), (i * tile, y + 14))
            draw.text((i * tile + 2, y + 1), f"{labels[row]} {float(scores[i]):.3f}", fill="black")
    return grid


def image_grid(images: list[Image.Image], captions: list[str], columns: int = 8, tile: int = 128) -> Image.Image:
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (tile * min(columns, len(images)), rows * (tile + 14)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * tile, (i // columns) * (tile + 14)
        grid.paste(image.convert("RGB").resize((tile, tile)), (x, y + 14))
        draw.text((x + 2, y + 1), caption[:24], fill="black")
    return grid


def start_run(accelerator, config, resume_step: int | None) -> "MetricsLog":
    """Output directory, config.json, trackers and the metrics log."""
    metrics_log = MetricsLog(accelerator, config.output_dir, resume_step=resume_step)
    setup_trackers(accelerator, config.log_with, config.tracker_project, config_dict(config), config.output_dir)
    if accelerator.is_main_process:
        os.makedirs(os.path.join(config.output_dir, "samples"), exist_ok=True)
        with open(os.path.join(config.output_dir, "config.json"), "w") as f:
            json.dump(config_dict(config), f, indent=1)
    return metrics_log


def resume_and_start_run(config, policy, accelerator) -> tuple[int, "MetricsLog"]:
    """Restores `resume_from_checkpoint` if set; opens the run's logs. -> (start step, metrics log)."""
    start_step = 0
    checkpoint = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir)
    if checkpoint:
        start_step = policy.load_checkpoint(checkpoint)
        accelerator.print(f"resumed from {checkpoint} at step {start_step}")
    return start_step, start_run(accelerator, config, resume_step=start_step if checkpoint else None)


def after_step(steps_done: int, config, policy, accelerator, stop: "StopFlag", run_eval) -> bool:
    """Periodic evaluation and checkpoint. On a stop signal (agreed across ranks) a checkpoint is
    written and True returned: the caller leaves its loop."""
    if config.eval_every and steps_done % config.eval_every == 0:
        run_eval(steps_done)
    stopping = all_sum(accelerator, float(stop.raised))[0] > 0
    if stopping or (config.checkpoint_every and steps_done % config.checkpoint_every == 0):
        policy.save_checkpoint(config.output_dir, steps_done, config.checkpoints_total_limit)
    if stopping:
        accelerator.print(f"stop signal: checkpoint written at step {steps_done}, exiting")
        accelerator.end_training()
    return stopping


def finish(config, policy, metrics_log, accelerator) -> dict:
    """Final weights in the format diffusers loads; per-rank checksums show the replicas agree."""
    metrics_log.log({"final/param_checksums": policy.checksums()}, config.max_steps)
    final_dir = policy.save_final(config.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return {"final_dir": final_dir, "step": config.max_steps}


# ----------------------------------------------------------------------------------------------
# Evaluation


def score_rows(reward_fn, images, rows) -> list[float]:
    return [float(r) for r in reward_fn(images, [row["prompt"] for row in rows])]


@torch.no_grad()
def evaluate(pipe, prompt_cache, rows: list[dict], reward_fn, rollout_settings, samples_per_prompt: int,
             accelerator, exact_match: bool) -> tuple[dict, list[Image.Image], list[float]]:
    """Fixed seeds (sample j of eval prompt i has seed i * 1000 + j) so every evaluation sees the same
    noise. Prompts are split across ranks (padded to equal length: every rank runs the same number
    of forwards, which sharded models require); rewards gathered. Returns (metrics, this rank's
    images, this rank's rewards)."""
    import qwen_image

    world, rank = accelerator.num_processes, accelerator.process_index
    jobs = [(i, j) for i in range(len(rows)) for j in range(samples_per_prompt)]
    per_rank = math.ceil(len(jobs) / world)
    mine = jobs[rank * per_rank:(rank + 1) * per_rank]
    n_real = len(mine)
    mine = mine + [jobs[-1]] * (per_rank - n_real)  # padding, dropped below
    prompts = [rows[i]["prompt"] for i, _ in mine]
    seeds = [i * 1000 + j for i, j in mine]
    _, images = qwen_image.rollout(pipe, prompt_cache, prompts, seeds, rollout_settings)
    scores = score_rows(reward_fn, images[:n_real], [rows[i] for i, _ in mine[:n_real]]) if n_real else []
    values = torch.tensor(scores + [float("nan")] * (per_rank - n_real), dtype=torch.float64, device=accelerator.device)
    gathered = accelerator.gather(values).cpu()
    gathered = gathered[~torch.isnan(gathered)]
    n = gathered.numel()
    metrics = {"eval/reward_mean": gathered.mean().item(), "eval/reward_std": gathered.std(unbiased=False).item(),
               "eval/reward_sem": standard_error(gathered), "eval/images": float(n)}
    if exact_match:
        exact = (gathered >= 1.0 - 1e-9).double()
        metrics["eval/exact_match"] = exact.mean().item()
        metrics["eval/exact_match_sem"] = standard_error(exact)
    return metrics, images[:n_real], scores


def standard_error(values: torch.Tensor) -> float:
    """Standard error of the mean of `values` (sample std / sqrt(n)); 0 for fewer than 2 values."""
    n = values.numel()
    return values.double().std(unbiased=True).item() / math.sqrt(n) if n > 1 else 0.0


def rollout_settings(config, num_inference_steps: int):
    """The trainers' sampling settings (both configs carry these fields)."""
    return qwen_image.RolloutSettings(height=config.height, width=config.width, num_inference_steps=num_inference_steps,
                                      true_cfg_scale=config.true_cfg_scale, negative_prompt=config.negative_prompt,
                                      chunk_size=config.rollout_chunk_size)


def make_eval(config, pipe, prompt_cache, eval_rows, reward_fn, accelerator, metrics_log):
    """-> run_eval(step): the eval prompts at fixed seeds with `eval_inference_steps`, logged."""
    from rewards import OCR_REWARDS

    settings = rollout_settings(config, config.eval_inference_steps)
    is_ocr = config.reward in OCR_REWARDS

    def run_eval(step: int) -> dict:
        return evaluate_and_log(pipe, prompt_cache, eval_rows, reward_fn, settings, config.eval_samples_per_prompt,
                                accelerator, is_ocr, metrics_log, step, config.output_dir)
    return run_eval


def evaluate_and_log(pipe, prompt_cache, rows, reward_fn, rollout_settings, samples_per_prompt, accelerator,
                     exact_match: bool, metrics_log, step: int, output_dir: str) -> dict:
    """The trainers' periodic evaluation: metrics to the log, a grid to samples/eval-STEP.png."""
    pipe.transformer.eval()
    metrics, images, scores = evaluate(pipe, prompt_cache, rows, reward_fn, rollout_settings, samples_per_prompt,
                                       accelerator, exact_match)
    pipe.transformer.train()
    if accelerator.is_main_process and images:
        image_grid(images[:32], [f"{s:.3f}" for s in scores[:32]]).save(
            os.path.join(output_dir, "samples", f"eval-{step:06d}.png"))
    metrics_log.log(metrics, step)
    summary = f"eval at step {step}: reward_mean {metrics['eval/reward_mean']:.4f} +- {metrics['eval/reward_sem']:.4f}"
    if "eval/exact_match" in metrics:
        summary += f", exact_match {metrics['eval/exact_match']:.4f} +- {metrics['eval/exact_match_sem']:.4f}"
    accelerator.print(f"{summary} ({int(metrics['eval/images'])} images; +- one standard error)")
    return metrics


# ----------------------------------------------------------------------------------------------
# Stop signal


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it (agreed across ranks) at step boundaries, writes a
    checkpoint and exits cleanly."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.raised = True


# ----------------------------------------------------------------------------------------------
# Launch


def launch(config, validate):
    """-> (accelerator, stop flag): the accelerator (with launch checks), `validate(config, world)`
    for the real number of processes, seeds set, SIGTERM/SIGINT caught."""
    from accelerate.utils import set_seed

    accelerator = make_accelerator(config)
    validate(config, accelerator.num_processes)
    set_seed(config.seed)
    return accelerator, StopFlag()


def make_accelerator(config):
    from accelerate import Accelerator

    accelerator = Accelerator(log_with=None if config.log_with == "none" else config.log_with,
                              project_dir=config.output_dir)
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise RuntimeError("launch with a MULTI_GPU accelerate config (configs/multi_gpu.yaml) and pass "
                           "--sharding fsdp2: the script shards the transformer itself (it samples with it too)")
    if int(os.environ.get("WORLD_SIZE", "1")) != accelerator.num_processes:
        raise RuntimeError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate set up "
                           f"{accelerator.num_processes} process(es): on CPU set ACCELERATE_USE_CPU=true")
    return accelerator


def all_sum(accelerator, *values) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def all_max(accelerator, value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def gather_object(accelerator, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]"""
    if accelerator.num_processes == 1:
        return [obj]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out


# ----------------------------------------------------------------------------------------------
# The policy and its DPO update, shared by the online and offline trainers


class DPOPolicy:
    """The trainable transformer (LoRA or full), its reference, optimizer and LR schedule, and the
    Diffusion-DPO update on interleaved [c0, r0, c1, r1, ...] latents.

    Reads these config fields: dtype, train_mode, lora_rank, lora_alpha, lora_targets, lora_init,
    gradient_checkpointing, sharding, learning_rate, adam_beta1, adam_beta2, weight_decay,
    adam_epsilon, lr_warmup_steps, max_grad_norm, beta, sigma_scheme, logit_mean, logit_std,
    micro_batch_pairs, max_nonfinite_in_a_row, height, width, seed.
    """

    def __init__(self, config, pipe, accelerator):
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params

        import qwen_image as qi

        self.config, self.accelerator = config, accelerator
        self.dtype = getattr(torch, config.dtype)
        self.transformer = transformer = pipe.transformer
        self.reference = None
        if config.train_mode == "lora":
            qi.add_lora(transformer, config.lora_rank, config.lora_alpha, config.lora_targets.split(","),
                        config.lora_init)
        else:
            self.reference = qi.make_frozen_reference(transformer)
            transformer.requires_grad_(True)
            for name in qi.dead_text_stream_modules(transformer):  # never reach the output: freeze
                transformer.get_submodule(name).requires_grad_(False)
        cast_training_params(transformer, dtype=torch.float32)  # fp32 trainable weights and AdamW state
        qi.set_gradient_checkpointing(transformer, config.gradient_checkpointing)
        if config.sharding == "fsdp2":
            from torch.distributed.fsdp import fully_shard

            for block in transformer.transformer_blocks:
                fully_shard(block)
            fully_shard(transformer)
        self.params = [p for p in transformer.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.params, lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                                      weight_decay=config.weight_decay, eps=config.adam_epsilon)
        lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.lr_warmup_steps)
        if config.sharding == "fsdp2":  # FSDP2 reduces gradients itself
            self.model = transformer
            self.optimizer, self.lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
        else:
            self.model, self.optimizer, self.lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
        transformer.train()
        self.nonfinite_in_a_row = 0

    # -- predictions
    def _velocity(self, module, x0, noise, sigmas, embeds, mask):
        import qwen_image as qi
        from dpo_loss import noisy_latents

        return qi.predict_velocity(module, noisy_latents(x0, noise, sigmas), sigmas, embeds, mask,
                                   self.config.height, self.config.width)

    def reference_velocity(self, *args):
        import qwen_image as qi

        with torch.no_grad():
            if self.reference is not None:
                return self._velocity(self.reference, *args)
            with qi.lora_disabled(self.transformer):
                return self._velocity(self.transformer, *args)

    def _no_sync(self, sync: bool):
        """Gradient accumulation: reduce across ranks only on the last micro-batch."""
        import contextlib

        if self.accelerator.num_processes == 1 or sync:
            return contextlib.nullcontext()
        if self.config.sharding == "fsdp2":
            @contextlib.contextmanager
            def fsdp_no_sync():
                self.model.set_requires_gradient_sync(False)
                try:
                    yield
                finally:
                    self.model.set_requires_gradient_sync(True)
            return fsdp_no_sync()
        return self.accelerator.no_sync(self.model)

    # -- the update
    def update(self, x0: torch.Tensor, pair_prompts: list[str], n_pairs: int, prompt_cache, step: int,
               updates: int = 1, stream: int = 0) -> dict:
        """`updates` optimizer steps on this rank's pairs: x0 [2P, S, 64] interleaved, n_pairs = P
        (0 allowed: x0 then holds 2 placeholder rows and this rank joins with zero weight). The loss
        is the mean over every pair of every rank. Noise and sigma: fresh per update, drawn from
        (seed, step, rank, stream, update), so a resumed run draws the same."""
        import dpo_loss
        from dpo_loss import velocity_target
        from pairing import sample_pair_noise_and_sigmas

        config, accelerator = self.config, self.accelerator
        world, rank = accelerator.num_processes, accelerator.process_index
        pairs_total = all_sum(accelerator, n_pairs)[0]
        metrics = {}
        if pairs_total == 0:
            return {"update/skipped_no_pairs": 1.0}
        # every rank runs the same number of micro-batches (the most any rank needs)
        n_micro = int(all_max(accelerator, max(1, math.ceil(n_pairs / config.micro_batch_pairs))))
        totals, good_updates = [0.0, 0.0, 0.0], 0
        for update in range(updates):
            generator = torch.Generator().manual_seed(derived_seed(config.seed, step, rank, stream, update) % 2**62)
            noise, sigmas = sample_pair_noise_and_sigmas(x0, generator, config.sigma_scheme,
                                                         logit_mean=config.logit_mean, logit_std=config.logit_std)
            target = velocity_target(x0, noise)
            sums = [0.0, 0.0, 0.0]  # loss, implicit accuracy, implicit reward margin, summed over pairs
            for micro in range(n_micro):
                lo = micro * config.micro_batch_pairs
                hi, weight = min(lo + config.micro_batch_pairs, n_pairs), 1.0
                if hi <= lo:  # padding micro-batch: same shapes, no contribution
                    lo, hi, weight = 0, 1, 0.0
                rows = slice(2 * lo, 2 * hi)
                embeds, mask = prompt_cache(pair_prompts[rows], device=x0.device, dtype=self.dtype)
                args = (x0[rows], noise[rows], sigmas[rows], embeds, mask)
                ref_pred = self.reference_velocity(*args)
                with self._no_sync(micro == n_micro - 1):
                    model_pred = self._velocity(self.model, *args)
                    loss, m = dpo_loss.diffusion_dpo_loss(model_pred, ref_pred, target[rows], config.beta)
                    # DDP / FSDP average gradients over ranks: scale to the global mean over pairs
                    accelerator.backward(loss * (weight * (hi - lo) * world / pairs_total))
                for i, value in enumerate((loss.item(), m["implicit_acc"], m["reward_margin"])):
                    sums[i] += weight * value * (hi - lo)
            # one optimizer step per update; skipped (and counted) when anything is non-finite
            local_bad = float(not math.isfinite(sums[0]) or any(
                p.grad is not None and not torch.isfinite(p.grad).all() for p in self.params))
            if all_sum(accelerator, local_bad)[0] > 0:
                self.optimizer.zero_grad(set_to_none=True)
                self.nonfinite_in_a_row += 1
                metrics["update/nonfinite_skipped"] = metrics.get("update/nonfinite_skipped", 0) + 1
                accelerator.print(f"step {step}: non-finite loss or gradient, update skipped "
                                  f"({self.nonfinite_in_a_row} in a row)")
                if self.nonfinite_in_a_row >= config.max_nonfinite_in_a_row:
                    raise FloatingPointError(f"{self.nonfinite_in_a_row} non-finite updates in a row "
                                             "(max_nonfinite_in_a_row); stopping")
                continue
            self.nonfinite_in_a_row = 0
            grad_norm = accelerator.clip_grad_norm_(self.params, config.max_grad_norm)
            self.optimizer.step()
            self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            metrics["update/grad_norm"] = float(grad_norm)
            good_updates += 1
            totals = [a + b for a, b in zip(totals, sums)]
        if good_updates:
            loss_total, acc_total, margin_total = all_sum(accelerator, *totals)
            denominator = pairs_total * good_updates
            metrics.update({"dpo/loss": loss_total / denominator, "dpo/implicit_acc": acc_total / denominator,
                            "dpo/implicit_reward_margin": margin_total / denominator})
        return metrics

    # -- state
    def save_checkpoint(self, output_dir: str, step: int, limit: int | None):
        return save_checkpoint(output_dir, step, self.model, self.optimizer, self.lr_scheduler,
                               {"nonfinite_in_a_row": self.nonfinite_in_a_row}, self.accelerator.is_main_process, limit)

    def load_checkpoint(self, path: str) -> int:
        state = load_checkpoint(path, self.model, self.optimizer, self.lr_scheduler)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        return state["step"]

    def checksums(self) -> list[float]:
        """Sum of |trainable weights| on every rank: equal when the replicas agree."""
        def full(p):
            p = p.detach()
            return p.full_tensor() if hasattr(p, "full_tensor") else p
        return gather_object(self.accelerator, sum(float(full(p).double().abs().sum()) for p in self.params))

    def save_final(self, output_dir: str) -> str | None:
        """LoRA: output_dir/lora/pytorch_lora_weights.safetensors (diffusers format); full:
        output_dir/transformer/ (QwenImageTransformer2DModel.from_pretrained reads it)."""
        import qwen_image as qi
        from safetensors.torch import save_file
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        full_state = get_model_state_dict(self.model, options=_options())  # collective under FSDP
        if not self.accelerator.is_main_process:
            return None
        if self.config.train_mode == "lora":
            out = os.path.join(output_dir, "lora")
            qi.save_lora(self.transformer, out, state_dict=full_state)
        else:
            out = os.path.join(output_dir, "transformer")
            os.makedirs(out, exist_ok=True)
            self.transformer.save_config(out)
            save_file({k: v.contiguous() for k, v in full_state.items()},
                      os.path.join(out, "diffusion_pytorch_model.safetensors"))
        return out
