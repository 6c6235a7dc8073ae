"""Evaluation: the eval prompts at fixed seeds, scored by the reward, gathered over ranks; the paired
gain over an earlier eval of the same images' prompts and noise (with its standard error); the
trainers' periodic eval (`make_eval`), which may take another run's step-0 eval (`eval_baseline`).
"""

from __future__ import annotations

import json
import math
import os
import time

import torch
from PIL import Image

import qwen_image_rollout
from run_config import ConfigError, differing_fields, require
from run_logs import baseline_eval, eval_history, image_grid, save_image


def score_rows(reward_fn, images, rows) -> list[float]:
    return score_rows_with_components(reward_fn, images, rows)[0]


def score_rows_with_components(reward_fn, images, rows) -> tuple[list[float], dict[str, list[float]]]:
    """(combined reward per image, {component: scores} for a weighted multi-reward, else {})."""
    from rewards import score_components

    return score_components(reward_fn, images, [row["prompt"] for row in rows])


def component_metrics(accelerator, parts: dict[str, list[float]], prefix: str = "reward") -> dict:
    """{prefix}/{name}/mean|std|max|min of each reward component over every rank's images."""
    out = {}
    for name, scores in parts.items():
        values = torch.tensor(scores, dtype=torch.float64, device=accelerator.device)
        values = (accelerator.gather(values) if accelerator.num_processes > 1 else values).cpu()
        out.update({f"{prefix}/{name}/mean": values.mean().item(), f"{prefix}/{name}/std": values.std(unbiased=False).item(),
                    f"{prefix}/{name}/max": values.max().item(), f"{prefix}/{name}/min": values.min().item()})
    return out


@torch.no_grad()
def evaluate(pipe, prompt_cache, rows: list[dict], reward_fn, rollout_settings, samples_per_prompt: int,
             accelerator, exact_match: bool, components: dict | None = None) -> tuple[dict, list[Image.Image], list[float]]:
    """Fixed seeds (sample j of eval prompt i has seed i * 1000 + j) so every evaluation sees the same
    noise. Prompts are split across ranks (padded to equal length: every rank runs the same number
    of forwards, which sharded models require); rewards gathered. Returns (metrics, this rank's
    images, this rank's rewards); pass a dict as `components` to receive this rank's per-component
    scores of a weighted reward."""
    world, rank = accelerator.num_processes, accelerator.process_index
    jobs = [(i, j) for i in range(len(rows)) for j in range(samples_per_prompt)]
    per_rank = math.ceil(len(jobs) / world)
    mine = jobs[rank * per_rank:(rank + 1) * per_rank]
    n_real = len(mine)
    mine = mine + [jobs[-1]] * (per_rank - n_real)  # padding, dropped below
    prompts = [rows[i]["prompt"] for i, _ in mine]
    seeds = [i * 1000 + j for i, j in mine]
    started = time.perf_counter()
    _, images = qwen_image_rollout.rollout(pipe, prompt_cache, prompts, seeds, rollout_settings)
    sampled = time.perf_counter()
    scores, parts = score_rows_with_components(reward_fn, images[:n_real], [rows[i] for i, _ in mine[:n_real]]) \
        if n_real else ([], {})
    scored = time.perf_counter()
    names = sorted(parts)
    # [per_rank, 1 + components]: the combined reward, then each component; NaN rows are padding
    table = torch.full((per_rank, 1 + len(names)), float("nan"), dtype=torch.float64)
    if n_real:
        table[:n_real] = torch.tensor([scores] + [parts[n] for n in names], dtype=torch.float64).T
    gathered = accelerator.gather(table.to(accelerator.device)).cpu()
    gathered = gathered[~torch.isnan(gathered[:, 0])]
    values = gathered[:, 0]
    metrics = {"eval/reward_mean": values.mean().item(), "eval/reward_std": values.std(unbiased=False).item(),
               "eval/reward_se": standard_error(values),
               "eval/images": float(values.numel()),
               "eval/rewards": values.tolist(),  # every image's reward, in (prompt, seed) order: paired gains
               # this rank's seconds sampling the eval images and scoring them (where an eval's time goes)
               "time/eval_sample_s": sampled - started, "time/eval_reward_s": scored - sampled}
    for k, name in enumerate(names):
        metrics[f"eval/{name}/reward_mean"] = gathered[:, 1 + k].mean().item()
    if exact_match:
        exact = exact_matches(values)
        metrics["eval/exact_match"] = exact.mean().item()
        metrics["eval/exact_match_se"] = standard_error(exact)
    if components is not None:
        components.update(parts)
    return metrics, images[:n_real], scores


def exact_matches(rewards: torch.Tensor) -> torch.Tensor:
    """1.0 where the OCR reward is a full match (1.0, up to float rounding), else 0.0 (float64)."""
    return (rewards >= 1.0 - 1e-9).double()


def standard_error(values: torch.Tensor) -> float:
    """Standard error of the mean of `values` (sample std / sqrt(n)); 0 for fewer than 2 values."""
    return (values.std(unbiased=True) / math.sqrt(len(values))).item() if len(values) > 1 else 0.0


def paired_gain(rewards: list[float], baseline: list[float], exact_match: bool) -> dict:
    """The change of the eval from `baseline` (an earlier eval of the same prompts and seeds, image by
    image) with the standard error of the paired differences: every image keeps its prompt and noise,
    so the seed-to-seed spread cancels (on the text world the gain's SE is ~0.03 exact match where
    the two evals' own SEs combine to ~0.05)."""
    after, before = torch.tensor(rewards, dtype=torch.float64), torch.tensor(baseline, dtype=torch.float64)
    diff = after - before
    gain = {"eval/reward_gain": diff.mean().item(), "eval/reward_gain_se": standard_error(diff)}
    if exact_match:
        exact_diff = exact_matches(after) - exact_matches(before)
        gain.update({"eval/exact_match_gain": exact_diff.mean().item(), "eval/exact_match_gain_se": standard_error(exact_diff)})
    return gain


def format_eval(metrics: dict) -> str:
    """'reward 0.5049 ± 0.0002 (64 images)': the mean with its standard error (and the paired gain
    since the run's first eval, when there is one)."""
    text = f"reward {metrics['eval/reward_mean']:.4f} ± {metrics.get('eval/reward_se', 0.0):.2g} " \
           f"({int(metrics['eval/images'])} images)"
    extra = [f"{k.split('/')[1]} {v:.4f}" for k, v in metrics.items() if k.endswith("/reward_mean") and k.count("/") == 2]
    if "eval/exact_match" in metrics:
        extra.append(f"exact match {metrics['eval/exact_match']:.3f} ± {metrics.get('eval/exact_match_se', 0.0):.2g}")
    text += f" [{', '.join(extra)}]" if extra else ""
    return text + (f"; since the first eval (paired): {format_gain(metrics)}" if "eval/reward_gain" in metrics else "")


def format_gain(metrics: dict) -> str:
    """'reward +0.0816 ± 0.016, exact match +0.094 ± 0.03': paired_gain's figures."""
    gains = [f"reward {metrics['eval/reward_gain']:+.4f} ± {metrics['eval/reward_gain_se']:.2g}"]
    if "eval/exact_match_gain" in metrics:
        gains.append(f"exact match {metrics['eval/exact_match_gain']:+.3f} ± {metrics['eval/exact_match_gain_se']:.2g}")
    return ", ".join(gains)


def rollout_settings(config, num_inference_steps: int, cache: str = ""):
    """The trainers' sampling settings (both configs carry these fields). `cache`: the training
    rollout's step cache (config.rollout_cache); the evaluation never passes one."""
    return qwen_image_rollout.RolloutSettings(height=config.height, width=config.width, num_inference_steps=num_inference_steps,
                                      true_cfg_scale=config.true_cfg_scale, negative_prompt=config.negative_prompt,
                                      chunk_size=config.rollout_chunk_size, cache=cache)


# The trainer fields an eval depends on (evaluate.py --run_dir takes these from a run). With the same
# values and `attention_backend`, two runs' step-0 evals are the same per-image rewards (at step 0 the
# policy is the base model: LoRA starts at B = 0 and `lora_init` only allows inits that keep the base
# weights), so a run may take another's (`eval_baseline`) instead of spending the eval again.
EVAL_SETTINGS = ("pretrained", "dtype", "eval_data", "max_eval_prompts", "reward", "reward_kwargs",
                 "eval_samples_per_prompt", "height", "width", "eval_inference_steps", "true_cfg_scale",
                 "negative_prompt", "max_sequence_length", "rollout_chunk_size")


def check_eval_baseline(config):
    """`eval_baseline`, before any model loads: a run folder whose metrics.jsonl holds a step-0 eval
    with per-image rewards, and whose config.json agrees on EVAL_SETTINGS and `attention_backend`."""
    where = config.eval_baseline
    if not where:
        return
    path = os.path.join(where, "config.json")
    require(os.path.isfile(path), "eval_baseline", f"{path!r} does not exist (a run folder is expected)")
    require(baseline_eval(where) is not None, "eval_baseline",
            f"{os.path.join(where, 'metrics.jsonl')!r} has no step-0 eval with per-image rewards (eval/rewards)")
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as error:
        raise ConfigError(f"config field `eval_baseline`: {path!r} is not valid JSON ({error})") from None
    changes = [f"{name}: {there!r} there, {here!r} here"
               for name, there, here in differing_fields(saved, config, EVAL_SETTINGS + ("attention_backend",))]
    require(not changes, "eval_baseline", f"{where!r} evaluated under other settings ({'; '.join(changes)})")


def check_resume_eval_settings(checkpoint: str, config):
    """A resume keeps EVAL_SETTINGS (and `attention_backend`) as the checkpoint's run had them when the
    run folder holds earlier evals: the paired gain compares every eval with the run's first one,
    image by image, which only means something for the same prompts, seeds and sampling."""
    path = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(path) or not eval_history(config.output_dir):
        return
    with open(path) as f:
        saved = json.load(f)
    changes = [f"{name}: {old!r} -> {new!r}"
               for name, old, new in differing_fields(saved, config, EVAL_SETTINGS + ("attention_backend",))]
    if changes:
        raise ConfigError(f"resume_from_checkpoint: {checkpoint} was evaluated with other eval settings "
                          f"({'; '.join(changes)}): the paired gain would compare other images with the first "
                          "eval; resume with the checkpoint's values or start a new run in another output_dir")


def make_eval(config, pipe, prompt_cache, eval_rows, reward_fn, accelerator, metrics_log):
    """-> run_eval(step): the eval prompts at fixed seeds with `eval_inference_steps`, logged with the
    paired gain over the run's first eval (read back from metrics.jsonl after a resume)."""
    from rewards import OCR_REWARDS

    settings = rollout_settings(config, config.eval_inference_steps)
    is_ocr = config.reward in OCR_REWARDS
    earlier = [row for row in eval_history(config.output_dir) if "eval/rewards" in row]
    first = {"rewards": earlier[0]["eval/rewards"] if earlier else None}

    def run_eval(step: int) -> dict:
        if step == 0 and config.eval_baseline:  # checked by check_eval_baseline: the same eval, already run
            metrics = {**baseline_eval(config.eval_baseline), "eval/taken_from": os.path.abspath(config.eval_baseline)}
            metrics_log.log(metrics, 0)
            accelerator.print(f"eval @ step 0: taken from {config.eval_baseline}: {format_eval(metrics)}")
        else:
            metrics = evaluate_and_log(pipe, prompt_cache, eval_rows, reward_fn, settings, config.eval_samples_per_prompt,
                                       accelerator, is_ocr, metrics_log, step, config.output_dir, baseline=first["rewards"])
        if first["rewards"] is None:
            first["rewards"] = metrics["eval/rewards"]
        return metrics
    return run_eval


TABLE_IMAGES = 64  # eval table rows that carry their image (the rest: numbers only)


def evaluate_and_log(pipe, prompt_cache, rows, reward_fn, rollout_settings, samples_per_prompt, accelerator,
                     exact_match: bool, metrics_log, step: int, output_dir: str, baseline: list | None = None) -> dict:
    """The trainers' periodic evaluation: metrics to the log and the terminal (with the paired gain
    over `baseline`, an earlier eval's per-image rewards), a grid to samples/eval-STEP.png and the
    trackers (with a table of this rank's images and rewards)."""
    start = time.perf_counter()
    pipe.transformer.eval()
    parts = {}
    metrics, images, scores = evaluate(pipe, prompt_cache, rows, reward_fn, rollout_settings, samples_per_prompt,
                                       accelerator, exact_match, components=parts)
    pipe.transformer.train()
    if baseline is not None and len(baseline) == len(metrics["eval/rewards"]):
        metrics.update(paired_gain(metrics["eval/rewards"], baseline, exact_match))
    metrics_log.log(metrics, step)
    if accelerator.is_main_process and images:
        grid = image_grid(images[:32], [f"{s:.3f}" for s in scores[:32]])
        save_image(grid, os.path.join(output_dir, "samples", f"eval-{step:06d}.png"), "eval grid")  # never costs the checkpoint
        metrics_log.log_image("eval/grid", grid, step, caption=f"step {step}: {format_eval(metrics)}")
        jobs = [(i, j) for i in range(len(rows)) for j in range(samples_per_prompt)][:len(images)]
        names = sorted(parts)
        metrics_log.log_table("eval/samples", ["prompt", "seed", "reward", *names, "image"],
                              [[rows[i]["prompt"], i * 1000 + j, scores[k], *[parts[n][k] for n in names],
                                images[k] if k < TABLE_IMAGES else None]  # media stays small on big evals
                               for k, (i, j) in enumerate(jobs)], step)
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(f"eval @ step {step}: {format_eval(metrics)} in {time.perf_counter() - start:.1f} s")  # above the bar
    return metrics
