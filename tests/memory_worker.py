"""Measures the peak memory of one DPO micro-batch for test_perf (run in a fresh process, so
nothing else in it allocates): the rise of the process's peak resident set (VmHWM, reset through
/proc/self/clear_refs) with glibc told to serve and return every allocation over 64 KiB by mmap, so
freed tensors leave the resident set. Prints one JSON line: [{size, checkpointing, predicted, measured}]."""

import ctypes
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import perf  # noqa: E402
import qwen_image as qi  # noqa: E402


def resident(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


def main():
    from diffusers import QwenImageTransformer2DModel

    spec = importlib.util.spec_from_file_location("plan", os.path.join(ROOT, "benchmarks", "plan.py"))
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    assert libc.mallopt(M_MMAP_THRESHOLD, 1 << 16) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 16) == 1
    config = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
                  num_attention_heads=4, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(8, 12, 12))
    cases = []
    for size, text_tokens, pairs, checkpointing in ((512, 20, 2, False), (512, 40, 2, True)):
        image_tokens = perf.image_tokens_for(size, size)
        meta = plan.build_meta_transformer(config, "lora", 8, 8, qi.RECIPE_LORA_TARGETS, torch.float32)
        saved = plan.saved_activation_bytes(meta, 2 * pairs, image_tokens, text_tokens, size, size)
        lora_grads = plan.count_params(meta)["trainable"] * 4
        predicted = plan.activation_peak_bytes(saved, checkpointing) + lora_grads

        torch.manual_seed(0)
        transformer = QwenImageTransformer2DModel(**config)
        params = qi.add_lora(transformer, 8, 8, qi.RECIPE_LORA_TARGETS)
        qi.set_gradient_checkpointing(transformer, checkpointing)
        x = torch.randn(2 * pairs, image_tokens, 64)
        embeds = torch.randn(2 * pairs, text_tokens, 32)
        sigmas = torch.rand(2 * pairs)

        def micro_batch():
            with torch.no_grad(), qi.lora_disabled(transformer):
                reference = qi.predict_velocity(transformer, x, sigmas, embeds, None, size, size)
            policy = qi.predict_velocity(transformer, x, sigmas, embeds, None, size, size)
            (policy - reference).float().square().mean().backward()

        micro_batch()  # first call: one-time allocations
        measured = []
        for _ in range(2):
            for p in params:
                p.grad = None
            before = resident("VmRSS")
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current resident set
            micro_batch()
            measured.append(resident("VmHWM") - before)
        cases.append(dict(size=size, checkpointing=checkpointing, predicted=predicted, measured=min(measured)))
    print(json.dumps(cases))


if __name__ == "__main__":
    main()
