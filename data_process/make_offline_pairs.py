"""Synthetic preference pairs from any model and reward (RankDPO / Syn-Pic style): roll out K
samples per prompt, score them, pick pairs with pairing.select_pairs, write a pairs parquet
(format: pairs_format.py).

    python data_process/make_offline_pairs.py --preset cpu_tiny --output outputs/pairs/tiny.parquet
    python data_process/make_offline_pairs.py --prompts data/ocr/train.parquet --output data/pairs/ocr.parquet

Sample j of prompt i has seed derived from (seed, i, j), so a row can be regenerated exactly.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import evaluate  # noqa: E402
import evaluation  # noqa: E402
import prompt_data  # noqa: E402
import run_config  # noqa: E402
from getting_started import TEXT_WORLD_PAIRS  # noqa: E402


@dataclass
class PairsConfig:
    pretrained: str = "Qwen/Qwen-Image"  # the model that samples: hub id, local save_pretrained dir, "tiny" or "tiny-bench"
    dtype: str = "bfloat16"  # bfloat16, float16 or float32
    prompts: str = "data/ocr/train.parquet"  # data_process parquet, a directory of them, or a .txt
    max_prompts: int = 0  # 0 = all
    samples_per_prompt: int = 8  # K samples per prompt, scored and paired within their group (>= 2)
    height: int = 512  # image height in pixels, a multiple of 16
    width: int = 512  # image width in pixels, a multiple of 16
    num_inference_steps: int = 35  # sampling steps per image
    true_cfg_scale: float = 1.0  # classifier-free guidance scale (1 = off)
    negative_prompt: str = " "  # CFG's negative prompt (used when true_cfg_scale > 1)
    max_sequence_length: int = 256  # text tokens kept per prompt
    chunk_size: int = 16  # images per pipeline call
    reward: str = "ocr"  # ocr, ocr_vlm, ocr_server, jpeg_compressibility, brightness, pickscore or clipscore; or weighted: ocr:1.0,pickscore:0.2
    reward_kwargs: str = "{}"  # JSON for rewards.build_reward; keyed by component name for a weighted reward
    pair_strategy: str = "best_worst"  # best_worst (best vs worst per group), top_bottom (floor(K/2) pairs per group) or all (every pair of a group, ties dropped)
    min_reward_margin: float = 0.0  # a pair needs chosen - rejected reward > this margin (>= 0)
    store_latents: bool = True  # the packed latents the images came from: offline training skips the VAE
    seed: int = 0  # sample j of prompt i has a seed derived from (seed, i, j)
    output: str = "data/pairs/pairs.parquet"  # the pairs parquet to write (pairs_format.py)
    overwrite_output: bool = False  # replace `output` if it exists (otherwise refused, as the trainers refuse a used output_dir)
    preset: str = ""  # a named group of overrides, applied first (listed at the end of --help)


PRESETS = {
    # Pairs for train_offline_dpo.py --preset text_world: the shipped text world, PP-OCRv5 reward; K = 16
    # (578 pairs; K = 8 gave 276, too few to move exact match beyond noise).
    "text_world": dict(pretrained=run_config.TEXT_WORLD, dtype="float32",
                       prompts=os.path.join(run_config.TEXT_WORLD_DATA, "train.txt"),
                       samples_per_prompt=16, height=32, width=64, num_inference_steps=8, chunk_size=32,
                       max_sequence_length=64, reward="ocr", pair_strategy="top_bottom",
                       output=TEXT_WORLD_PAIRS),
    "cpu_tiny": dict(pretrained="tiny", dtype="float32", prompts=run_config.TINY_PROMPTS,
                     samples_per_prompt=8, height=64, width=64, num_inference_steps=4, chunk_size=32,
                     max_sequence_length=64, reward="brightness", pair_strategy="top_bottom"),
}


def validate(config: PairsConfig):
    from pairing import PAIR_STRATEGIES
    from run_config import data_source_exists, require, validate_reward

    require(data_source_exists(config.prompts), "prompts", f"file {config.prompts!r} does not exist")
    require(config.samples_per_prompt >= 2, "samples_per_prompt", "need at least 2 samples per prompt")
    evaluate.validate_sampling(config)  # max_prompts, resolution, steps, CFG, chunk size: as evaluate.py checks them
    run_config.require_pretrained(config.pretrained)  # a typo'd local path: one line, before any model loads
    validate_reward(config.reward, config.reward_kwargs)  # a name or weighted components
    require(config.pair_strategy in PAIR_STRATEGIES, "pair_strategy", f"must be one of {PAIR_STRATEGIES}")
    require(config.min_reward_margin >= 0, "min_reward_margin", "must be >= 0")
    require(bool(config.output), "output", "must be a file path")
    # a folder is never replaced by the file (nothing a user owns is deleted); os.replace would refuse
    # it anyway, but only after every rollout
    require(not os.path.isdir(config.output), "output", f"{config.output!r} is a folder; give the parquet file to write "
            f"(e.g. {os.path.join(config.output, 'pairs.parquet')})")
    require(not os.path.isdir(config.output + ".tmp"), "output", f"{config.output + '.tmp'!r} (where the parquet is "
            "written before it is renamed) is a folder: move it away")
    if os.path.exists(config.output) and not config.overwrite_output:  # cli: one line, exit status 2
        raise FileExistsError(f"output {config.output!r} already exists: pass --overwrite_output true to replace it, "
                              "or choose another --output")
    run_config.require_writable_dir(os.path.dirname(os.path.abspath(config.output)), "output")  # fail now, not after the rollouts


def main(argv=None):
    from run_config import parse_config

    config = parse_config(PairsConfig, PRESETS, argv)
    validate(config)
    return generate(config)


def generate(config: PairsConfig) -> dict:
    from tqdm.auto import tqdm

    import qwen_image as qi
    import qwen_image_rollout as qir
    from pairs_format import image_to_png_bytes, latents_to_bytes, write_pairs
    from pairing import pair_stats, select_pairs
    from rewards import build_reward, uses_ocr_target

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = prompt_data.load_prompts(config.prompts, need_ocr_target=uses_ocr_target(config.reward),
                                    max_rows=config.max_prompts)
    reward_fn = build_reward(config.reward, **json.loads(config.reward_kwargs))
    pipe = qi.load_pipeline(config.pretrained, dtype=getattr(torch, config.dtype), device=device)
    cache = qi.PromptCache(pipe, config.max_sequence_length)
    settings = qir.RolloutSettings(height=config.height, width=config.width, num_inference_steps=config.num_inference_steps,
                                  true_cfg_scale=config.true_cfg_scale, negative_prompt=config.negative_prompt,
                                  chunk_size=config.chunk_size)
    K = config.samples_per_prompt
    prompts_per_batch = max(1, config.chunk_size // K)
    out_rows, totals = [], {"prompts": 0, "pairs": 0, "groups_without_pair": 0}
    for start in tqdm(range(0, len(rows), prompts_per_batch), desc="pairs"):
        batch = rows[start:start + prompts_per_batch]
        flat = [row for row in batch for _ in range(K)]
        seeds = [prompt_data.derived_seed("offline_pairs", config.seed, start + i, j)
                 for i in range(len(batch)) for j in range(K)]
        group_ids = [start + i for i in range(len(batch)) for _ in range(K)]
        latents, images = qir.rollout(pipe, cache, [r["prompt"] for r in flat], seeds, settings)
        scores = torch.tensor(evaluation.score_rows(reward_fn, images, flat), dtype=torch.float64)
        pairs = select_pairs(group_ids, scores, config.pair_strategy, config.min_reward_margin)
        stats = pair_stats(group_ids, scores, pairs)
        totals["prompts"] += len(batch)
        totals["pairs"] += pairs.shape[0]
        totals["groups_without_pair"] += int(stats["groups_without_pair"])
        for c, r in pairs.tolist():
            row = {"prompt": flat[c]["prompt"], "chosen_image": image_to_png_bytes(images[c]),
                   "rejected_image": image_to_png_bytes(images[r]), "chosen_score": scores[c].item(),
                   "rejected_score": scores[r].item(), "chosen_seed": seeds[c], "rejected_seed": seeds[r]}
            if config.store_latents:
                row.update(chosen_latents=latents_to_bytes(latents[c]), rejected_latents=latents_to_bytes(latents[r]),
                           latents_shape=list(latents.shape[1:]), height=config.height, width=config.width)
            out_rows.append(row)
    if not out_rows:
        raise run_config.InputError("no pairs: every prompt group tied or stayed below min_reward_margin; nothing written")
    write_pairs(out_rows, config.output)
    print(json.dumps({**totals, "output": config.output}))
    return totals


if __name__ == "__main__":
    from run_config import cli

    cli(main)  # a config error: one line on stderr, exit status 2
