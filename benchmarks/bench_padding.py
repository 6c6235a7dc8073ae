"""Text padding in rollout chunks: how much of the rollout's transformer work is padding, on the OCR
prompt sample (data/ocr_sample/train.txt, 150 prompts of the recipe's kind).

qwen_image_rollout.rollout takes the step's flat prompt list (each prompt repeated K times, consecutively:
train_online_dpo builds it so) in chunks of rollout_chunk_size rows and pads every row of a chunk
to the chunk's longest prompt. Padded text tokens still take part in the joint attention and in the
text stream's projections and MLPs, so they cost FLOPs (flop_formula.forward_flops has the text length).
With K = 16 and chunks of 16 a chunk is ONE prompt's K samples: nothing is padded. Padding appears
when a chunk holds several prompts (chunk > K, e.g. the text world's K = 8 in chunks of 32) and in
the evaluation (1 sample per prompt: 16 prompts a chunk). For those cases it also shows what
sorting the prompts by length before chunking would save.

Token lengths: the real Qwen2.5-VL tokenizer is not available offline here, so two proxies are
measured: the text world's own tokenizer (a small byte-level BPE, Qwen2's pre-tokenizer, ~500
tokens: more tokens per word than Qwen2.5's 151k vocabulary) under the pipeline's prompt template
(its 34-token system prefix dropped, as the pipeline drops it), and the character count / 4 + 5 (about
4 characters per token for English under a large BPE, plus the template's ~5 closing tokens).
FLOPs: perf.rollout_step_flops at the real Qwen-Image config, 512x512, 35 steps, LoRA rank 64.

    python benchmarks/bench_padding.py [--prompts data/ocr_sample/train.txt] [--draws 200]

Last line: a JSON object with every figure.
"""

import argparse
import functools
import json
import os
import random
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import flop_formula  # noqa: E402
import qwen_image as qi  # noqa: E402

# QwenImagePipeline's prompt_template_encode (diffusers 0.42.1 pipeline_qwenimage.py); its first 34
# tokens (prompt_template_encode_start_idx) are dropped after encoding.
TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
            "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
            "<|im_end|>\n<|im_start|>assistant\n")


def token_lengths(prompts, tokenizer_dir: str, max_sequence_length: int) -> list[int]:
    """Tokens per prompt as the pipeline keeps them: template-wrapped, system prefix dropped."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    prefix = len(tokenizer(TEMPLATE.split("{}")[0])["input_ids"])
    return [min(len(tokenizer(TEMPLATE.format(p))["input_ids"]) - prefix, max_sequence_length) for p in prompts]


def char_lengths(prompts, max_sequence_length: int) -> list[int]:
    """The proxy: characters / 4 + 5 template tokens."""
    return [min(round(len(p) / 4) + 5, max_sequence_length) for p in prompts]


def chunk_padding(lengths: list[int], chunk: int) -> tuple[int, int]:
    """(padded text positions, all text positions) of a rollout of these rows in chunks."""
    padded = total = 0
    for start in range(0, len(lengths), chunk):
        rows = lengths[start:start + chunk]
        padded += sum(max(rows) - n for n in rows)
        total += max(rows) * len(rows)
    return padded, total


@functools.lru_cache(maxsize=None)
def forward_flops(text_tokens: int) -> int:
    """One rollout forward at the real config, 512x512, recipe LoRA rank 64 (flop_formula.forward_flops)."""
    return flop_formula.forward_flops(qi.QWEN_IMAGE_TRANSFORMER_CONFIG, flop_formula.image_tokens_for(512, 512), text_tokens, 64,
                              qi.RECIPE_LORA_TARGETS)


def case(lengths: list[int], prompts_per_rank: int, k: int, chunk: int, draws: int, sort: bool, seed: int = 0) -> dict:
    """Mean over `draws` random steps (prompts drawn without replacement) of the padded fraction of
    text positions and of the rollout FLOPs spent on padding (vs every row at its own length)."""
    rng = random.Random(seed)
    padded = total = flops = exact = 0
    for _ in range(draws):
        step = rng.sample(lengths, prompts_per_rank)
        if sort:
            step = sorted(step)
        rows = [n for n in step for _ in range(k)]  # train_online_dpo: each prompt K times, consecutively
        p, t = chunk_padding(rows, chunk)
        padded, total = padded + p, total + t
        # perf.rollout_step_flops: every row of a chunk at the chunk's longest length, 35 steps
        flops += sum(len(rows[s:s + chunk]) * forward_flops(max(rows[s:s + chunk])) for s in range(0, len(rows), chunk))
        exact += sum(forward_flops(n) for n in rows)
    return {"prompts_per_rank": prompts_per_rank, "k": k, "chunk": chunk, "sorted": sort,
            "padded_text_fraction": padded / total, "padding_flop_fraction": (flops - exact) / flops}


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--prompts", default=os.path.join(ROOT, "data", "ocr_sample", "train.txt"))
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "worlds", "text_world", "tokenizer"))
    parser.add_argument("--max_sequence_length", type=int, default=256)
    parser.add_argument("--draws", type=int, default=200)
    args = parser.parse_args(argv)

    with open(args.prompts, encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()]
    measures = {"world_tokenizer": token_lengths(prompts, args.tokenizer, args.max_sequence_length),
                "chars_div_4_plus_5": char_lengths(prompts, args.max_sequence_length)}
    # (prompts per rank, K, chunk): the recipe (32 prompts over 4 GPUs, K 16, chunks of 16), the same with
    # chunks of 32 and 64, the text world's shape (8 prompts, K 8, chunks of 32), the recipe's eval (1 sample
    # per prompt: 64 eval prompts per rank, chunks of 16).
    shapes = [(8, 16, 16), (8, 16, 32), (8, 16, 64), (8, 8, 32), (64, 1, 16)]
    result = {"prompts": len(prompts), "draws": args.draws, "lengths": {}, "cases": {}}
    for name, lengths in measures.items():
        result["lengths"][name] = {"mean": sum(lengths) / len(lengths), "min": min(lengths), "max": max(lengths)}
        result["cases"][name] = [case(lengths, n, k, c, args.draws, sort) for n, k, c in shapes for sort in (False, True)]
    for name, rows in result["cases"].items():
        stats = result["lengths"][name]
        print(f"\n{name}: text length mean {stats['mean']:.1f}, min {stats['min']}, max {stats['max']}")
        print(f"  {'prompts/rank':>12s} {'K':>3s} {'chunk':>5s} {'sorted':>6s} {'padded text':>11s} {'padding FLOPs':>13s}")
        for r in rows:
            print(f"  {r['prompts_per_rank']:12d} {r['k']:3d} {r['chunk']:5d} {str(r['sorted']):>6s} "
                  f"{r['padded_text_fraction']:11.2%} {r['padding_flop_fraction']:13.3%}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
