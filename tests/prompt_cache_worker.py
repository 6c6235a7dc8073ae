"""Run by test_qwen_image.py under torchrun (2 CPU processes): warms a PromptCache across ranks and
saves, per rank, how many prompts its text encoder saw and every cached embedding."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import qwen_image as qi  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
pipe = qi.load_pipeline("tiny", dtype=torch.float32)
seen = []
pipe.text_encoder.register_forward_hook(lambda m, a, kw, out: seen.append(kw["input_ids"].shape[0]), with_kwargs=True)
prompts = ['A sign that says "Open" on a wall', "A red apple, photo", 'A cup with the word "Morning"',
           "a cat", "a dog on a sofa", 'a neon sign reading "Hi"', " "]
cache = qi.PromptCache(pipe, max_sequence_length=64)
cache.warm(prompts + prompts[:3], batch_size=2, rank=rank, world_size=world)  # repeats encoded once
torch.save({"encoded_prompts": sum(seen), "embeds": dict(cache.embeds)}, os.path.join(sys.argv[1], f"rank{rank}.pt"))
dist.destroy_process_group()
