"""What a run writes while it runs: metrics.jsonl (and accelerate's trackers, with images and tables),
reading its eval rows back, and the sample grids.
"""

from __future__ import annotations

import json
import math
import os
import sys

from PIL import Image, ImageDraw

from run_config import InputError, describe_os_error

_WARNED: set[str] = set()  # the kinds of side file whose failure was reported (once each)


def side_write(what: str, path: str, write) -> bool:
    """`write()` for a file the run can do without (an eval or sample grid, a tracker image or table,
    the model card): an OSError (a full disk, a read-only folder) is a warning naming the file, once
    per kind, and the run goes on: it must never cost the checkpoint. -> whether it was written."""
    try:
        write()
        return True
    except OSError as error:
        if what not in _WARNED:
            _WARNED.add(what)
            print(f"warning: could not write the {what} {path} ({describe_os_error(error)}); the run goes on "
                  f"without it (later failures of the {what} are not reported)", file=sys.stderr, flush=True)
        return False


def save_image(image: Image.Image, path: str, what: str) -> bool:
    """A grid PNG as a side write (side_write)."""
    return side_write(what, path, lambda: image.save(path))


class MetricsLog:
    """metrics.jsonl (one object per logged step, rank 0) plus accelerate's trackers."""

    def __init__(self, accelerator, output_dir: str, resume_step: int | None = None):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if accelerator.is_main_process and resume_step is not None and os.path.exists(self.path):
            # drop rows logged after the checkpoint we resume from (they will be logged again) and the
            # earlier leg's final row; a cut-off last line (a kill mid-write) is dropped, a damaged
            # line before it is an error naming it
            with open(self.path) as f:
                lines = f.readlines()
            kept = []
            for number, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    if number < len(lines):
                        raise InputError(f"{self.path}: line {number} is not a JSON object; repair or remove it") from None
                    accelerator.print(f"{self.path}: dropping its damaged last line {number}")
                    continue
                if row.get("step", 0) <= resume_step and not any(k.startswith("final/") for k in row):
                    kept.append(line)
            with open(self.path, "w") as f:
                f.writelines(kept)

    def log(self, metrics: dict, step: int):
        if self.accelerator.is_main_process:
            row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        # trackers get the numbers; lists (prompt ids, per-rank checksums) stay in metrics.jsonl
        self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def _tracker(self, name):
        if not self.accelerator.is_main_process or name not in [t.name for t in self.accelerator.trackers]:
            return None
        return self.accelerator.get_tracker(name, unwrap=True)  # the wandb run / the SummaryWriter

    def log_image(self, name: str, image: Image.Image, step: int, caption: str = ""):
        """A sample grid to the trackers: wandb.Image (wandb) / add_image (tensorboard)."""
        import numpy as np

        if (run := self._tracker("wandb")) is not None:
            import wandb

            side_write("tracker image", f"{name} (wandb)",
                       lambda: run.log({name: wandb.Image(image, caption=caption or None)}, step=step))
        if (writer := self._tracker("tensorboard")) is not None:
            side_write("tracker image", f"{name} (tensorboard)",
                       lambda: writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC"))

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int):
        """Per-image results to the trackers: wandb.Table (PIL cells become images) / a markdown table
        as tensorboard text."""
        if (run := self._tracker("wandb")) is not None:
            import wandb

            data = [[wandb.Image(v) if isinstance(v, Image.Image) else v for v in row] for row in rows]
            side_write("tracker table", f"{name} (wandb)",
                       lambda: run.log({name: wandb.Table(columns=columns, data=data)}, step=step))
        if (writer := self._tracker("tensorboard")) is not None:
            keep = [i for i, v in enumerate(rows[0]) if not isinstance(v, Image.Image) and v is not None] if rows else []
            lines = ["| " + " | ".join(columns[i] for i in keep) + " |", "|" + "---|" * len(keep)]
            lines += ["| " + " | ".join(f"{row[i]:.4f}" if isinstance(row[i], float) else str(row[i]) for i in keep) + " |"
                      for row in rows]
            side_write("tracker table", f"{name} (tensorboard)", lambda: writer.add_text(name, "\n".join(lines), step))


def setup_trackers(accelerator, log_with: str, project: str, config: dict, output_dir: str):
    """wandb runs offline when no API key is configured; tensorboard writes under output_dir."""
    if log_with == "none":
        return
    if log_with == "wandb" and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_DIR", output_dir)
    accelerator.init_trackers(project, config={k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})


def eval_history(output_dir: str) -> list[dict]:
    """The eval rows of output_dir/metrics.jsonl (all of them, also those logged before a resume)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # a line cut off by a kill (MetricsLog repairs the file on resume)
                continue
            if "eval/reward_mean" in row:
                rows.append(row)
    return rows


def baseline_eval(run_dir: str) -> dict | None:
    """The step-0 eval row of run_dir/metrics.jsonl (its eval/* values), or None. Read up to that row
    only: the run may still be writing (or have been killed mid-write) further down."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path}: line {number} is not a JSON object; repair or remove it") from None
            if row.get("step") == 0 and "eval/rewards" in row:
                return {k: v for k, v in row.items() if k.startswith("eval/")}
    return None


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
