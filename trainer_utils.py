"""What both training scripts (and evaluate.py) need besides the model and the loss: config parsing
with presets, prompt data, the per-step prompt stream, atomic checkpoints, metric logging, sample
grids, evaluation, and a clean stop on SIGTERM. Nothing here knows the DPO math.
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
import time

import torch
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------------------------
# Config


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


def config_dict(config) -> dict:
    return dataclasses.asdict(config)


# ----------------------------------------------------------------------------------------------
# Prompt data

PROMPT_COLUMNS = ("prompt", "ground_truth", "data_source", "split", "index")


def load_prompts(path: str, need_ocr_target: bool = False) -> list[dict]:
    """Rows {prompt, ground_truth, uid} from a data_process parquet (columns PROMPT_COLUMNS), a
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
    metrics = {"eval/reward_mean": gathered.mean().item(), "eval/reward_std": gathered.std(unbiased=False).item(),
               "eval/images": float(gathered.numel())}
    if exact_match:
        metrics["eval/exact_match"] = (gathered >= 1.0 - 1e-9).double().mean().item()
    return metrics, images[:n_real], scores


# ----------------------------------------------------------------------------------------------
# Stop signal


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it (agreed across ranks) at step boundaries, writes a
    checkpoint and exits cleanly."""

    def __init__(self):
        self.raised = False
        self.received_at = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        self.raised = True
        self.received_at = time.time()
