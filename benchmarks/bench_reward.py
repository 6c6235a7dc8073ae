"""Images per second of each local reward on 512x512 images (rendered text, as the OCR task makes).

    python benchmarks/bench_reward.py [--images 32] [--repeats 3] [--vlm] [--world]
    python benchmarks/bench_reward.py --rec_widths 48,96,160 [--images 256] [--repeats 5]

`ocr` (rewards.PaddleOcrReward: the images of one size detected together, onnxruntime on torch's
threads) is timed against `ocr_per_image` (the engine's
own ocr() one image at a time) and `ocr_onnxruntime_threads` (`ocr` with onnxruntime's default
threads: every core), on the same images, with the same scores (checked). Run it with
OMP_NUM_THREADS=1 for the 1-thread figures. `--world` renders the text world's images instead (3-letter capitals at
32x64, build_text_world.render). `--vlm` adds the ocr_vlm path on a tiny random Qwen2.5-VL built
locally (its speed says nothing about an 8B model; it shows the per-image overhead of the code
path). Last line: a JSON object.

`--rec_widths` compares `ocr` at each PaddleOcrReward rec_min_width given with the default (320) on
text-world images: `--images` of the world pipeline's samples (eval.txt prompts, seeds i*1000+j as
the trainers' eval, the images the reward scores in training) and as many renders. Per width: median
seconds per 64 images and their range (each chunk of 64 timed, the widths interleaved and their order
rotated per repeat), the speed over the default (per chunk, paired), the fraction of images whose text
is the default's, and the mean absolute reward difference.
"""

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

import rewards  # noqa: E402

WORDS = ["Hello World", "Open 24 Hours", "Coffee Shop", "Grand Opening", "Slow Down", "Keep Calm", "Fresh Bread",
         "Jazz Night"]


def render(text, size=512):
    image = Image.new("RGB", (size, size), (245, 240, 230))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=44)
    draw.text(((size - draw.textlength(text, font=font)) / 2, size / 2 - 22), text, fill=(20, 20, 20), font=font)
    return image


def world_images(count: int) -> tuple[list, list[str], list[str]]:
    """(images, prompts, source of each): `count` samples of the world pipeline and `count` renders."""
    import torch

    import build_text_world as world
    import qwen_image
    import qwen_image_rollout
    import run_config

    eval_prompts = [line.strip() for line in open(os.path.join(run_config.TEXT_WORLD_DATA, "eval.txt")) if line.strip()]
    jobs = [(i % len(eval_prompts), i // len(eval_prompts)) for i in range(count)]
    prompts = [eval_prompts[i] for i, _ in jobs]
    pipe = qwen_image.load_pipeline(run_config.TEXT_WORLD, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    settings = qwen_image_rollout.RolloutSettings(height=32, width=64, num_inference_steps=8, chunk_size=32)
    cache = qwen_image.PromptCache(pipe, 64)
    _, sampled = qwen_image_rollout.rollout(pipe, cache, prompts, [i * 1000 + j for i, j in jobs], settings)
    rng, fonts = random.Random(0), world.load_fonts(32)
    words = [world.WORDS[i % len(world.WORDS)] for i in range(count)]
    rendered = [world.render(word, rng, fonts, 32, 64) for word in words]
    return (sampled + rendered, prompts + [f'A sign that says "{word}"' for word in words],
            ["pipeline"] * count + ["render"] * count)


def compare_rec_widths(widths: list[int], count: int, repeats: int):
    images, prompts, sources = world_images(count)
    chunks = [(start, min(start + 64, len(images))) for start in range(0, len(images), 64)]
    variants = {"default": rewards.PaddleOcrReward(), **{w: rewards.PaddleOcrReward(rec_min_width=w) for w in widths}}
    for ocr in variants.values():  # load outside the timing
        ocr.transcribe(images[:2])
    seconds = {name: [] for name in variants}  # per 64 images, one entry per (repeat, chunk)
    texts = {}
    names = list(variants)
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for start, end in chunks:
            for name in order:
                began = time.perf_counter()
                found = variants[name].transcribe(images[start:end])
                seconds[name].append((time.perf_counter() - began) * 64 / (end - start))
                texts.setdefault(name, [None] * len(images))[start:end] = found
    scores = {name: rewards._score_all(texts[name], prompts, strict=False) for name in names}
    rows = []
    for name in names:
        ratios = [d / v for d, v in zip(seconds["default"], seconds[name])]
        row = {"rec_min_width": 320 if name == "default" else name,
               "s_per_64_median": round(statistics.median(seconds[name]), 3),
               "s_per_64_range": [round(min(seconds[name]), 3), round(max(seconds[name]), 3)],
               "speed_over_default_median": round(statistics.median(ratios), 3),
               "speed_over_default_range": [round(min(ratios), 3), round(max(ratios), 3)],
               "mean_reward": round(statistics.mean(scores[name]), 4)}
        for source in ("pipeline", "render"):
            picked = [i for i, s in enumerate(sources) if s == source]
            same = sum(texts[name][i] == texts["default"][i] for i in picked)
            row[f"same_text_{source}"] = round(same / len(picked), 4)
            row[f"mean_abs_reward_diff_{source}"] = round(
                statistics.mean(abs(scores[name][i] - scores["default"][i]) for i in picked), 4)
        rows.append(row)
        print(json.dumps(row))
    print(json.dumps({"images": len(images), "repeats": repeats, "timed_chunks_per_variant": len(seconds["default"]),
                      "load_average": round(os.getloadavg()[0], 1), "rows": rows}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vlm", action="store_true")
    parser.add_argument("--world", action="store_true", help="the text world's 32x64 word renders")
    parser.add_argument("--rec_widths", default="", help="e.g. 48,96,160: rec_min_width against the default")
    args = parser.parse_args()
    if args.rec_widths:
        compare_rec_widths([int(w) for w in args.rec_widths.split(",")], args.images, args.repeats)
        return
    if args.world:
        import build_text_world as world

        rng, fonts = random.Random(0), world.load_fonts(32)
        words = [world.WORDS[i % len(world.WORDS)] for i in range(args.images)]
        images = [world.render(word, rng, fonts, 32, 64) for word in words]
        size = "32x64"
    else:
        words = [WORDS[i % len(WORDS)] for i in range(args.images)]
        images = [render(word) for word in words]
        size = "512x512"
    prompts = [f'A sign that says "{word}"' for word in words]
    ocr = rewards.build_reward("ocr")

    def ocr_per_image(images, prompts):
        engine = ocr._load()
        texts = []
        for image in images:
            lines = engine.ocr(np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1]))[0] or []
            texts.append(" ".join(line[1][0] for line in lines))
        return [rewards.ocr_score(text, rewards.ocr_target(prompt)) for text, prompt in zip(texts, prompts)]

    candidates = {"ocr": ocr, "ocr_per_image": ocr_per_image,
                  "ocr_onnxruntime_threads": rewards.build_reward("ocr", threads=0),
                  "jpeg_compressibility": rewards.build_reward("jpeg_compressibility"),
                  "brightness": rewards.build_reward("brightness")}
    if args.vlm:
        import qwen_image
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        path = tempfile.mkdtemp()
        pipe = qwen_image.build_tiny_pipeline(0)
        pipe.text_encoder.save_pretrained(path)
        pipe.tokenizer.save_pretrained(path)
        Qwen2VLImageProcessorPil(patch_size=14, temporal_patch_size=2, merge_size=2).save_pretrained(path)
        candidates["ocr_vlm_tiny"] = rewards.build_reward("ocr_vlm", model=path, dtype="float32", max_new_tokens=16)
    for fn in candidates.values():  # load lazily outside the timing
        fn(images[:2], prompts[:2])
    result = {"image_size": size, "images": args.images}
    scores = {}
    for _ in range(args.repeats):  # interleaved repeats, medians reported
        for name, fn in candidates.items():
            start = time.perf_counter()
            scores[name] = fn(images, prompts)
            result.setdefault(name, []).append(args.images / (time.perf_counter() - start))
    assert scores["ocr"] == scores["ocr_per_image"] == scores["ocr_onnxruntime_threads"], "batching changed a score"
    result["ocr_mean_score"] = sum(scores["ocr"]) / len(scores["ocr"])
    speedups = [a / b for a, b in zip(result["ocr"], result["ocr_per_image"])]  # per interleaved repeat
    out = {k: (round(statistics.median(v), 2) if isinstance(v, list) else v) for k, v in result.items()}
    out = {f"{k}_images_per_s" if k in candidates else k: v for k, v in out.items()}
    out["ocr_over_per_image_speed"] = round(statistics.median(speedups), 3)
    out["ocr_over_per_image_speed_range"] = [round(min(speedups), 3), round(max(speedups), 3)]
    threads = [a / b for a, b in zip(result["ocr"], result["ocr_onnxruntime_threads"])]
    out["ocr_over_onnxruntime_threads_speed"] = round(statistics.median(threads), 3)
    out["ocr_over_onnxruntime_threads_speed_range"] = [round(min(threads), 3), round(max(threads), 3)]
    out["load_average"] = round(os.getloadavg()[0], 1)  # a busy machine: the figures are noisy
    print(json.dumps(out))


if __name__ == "__main__":
    main()
