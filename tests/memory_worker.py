"""Measures memory for test_perf's checks of benchmarks/plan.py (run in a fresh process, so nothing
else in it allocates), with glibc told to serve and return every allocation over 64 KiB by mmap, so
freed tensors leave the resident set. Prints one JSON line of cases {predicted, measured, ...}.

    python tests/memory_worker.py          # one DPO micro-batch: peak resident set rise (VmHWM)
    python tests/memory_worker.py group    # one group micro-batch of K rows with the old adapter's forward
    python tests/memory_worker.py vae      # VAE decode: the peak of the resident set after each op
    python tests/memory_worker.py weights  # the old adapter and full mode's reference copy: resident set rise"""

import ctypes
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import flop_formula  # noqa: E402
import qwen_image as qi  # noqa: E402


def resident(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


CONFIG = dict(patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
              num_attention_heads=4, joint_attention_dim=32, guidance_embeds=False, axes_dims_rope=(8, 12, 12))


def load_plan():
    spec = importlib.util.spec_from_file_location("plan", os.path.join(ROOT, "benchmarks", "plan.py"))
    plan = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan)
    return plan


def main(kind="dpo"):
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    assert libc.mallopt(M_MMAP_THRESHOLD, 1 << 16) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 1 << 16) == 1
    cases = {"dpo": micro_batch_cases, "group": group_cases, "vae": vae_cases, "weights": weight_cases}[kind](load_plan())
    print(json.dumps(cases))


def micro_batch_cases(plan, settings=((512, 20, 4, False, False), (512, 40, 4, True, False))):
    """(size, text tokens, rows, checkpointing, old adapter): the peak rise of one micro-batch (the
    reference forward, the old adapter's when it has one, the policy's forward and backward) against
    the planner's activation peak at that many rows plus the LoRA gradients."""
    from diffusers import QwenImageTransformer2DModel

    from policy import OLD_ADAPTER, add_old_adapter, adapter_active

    config = CONFIG
    cases = []
    for size, text_tokens, rows, checkpointing, old in settings:
        image_tokens = flop_formula.image_tokens_for(size, size)
        meta = plan.build_meta_transformer(config, "lora", 8, 8, qi.RECIPE_LORA_TARGETS, torch.float32)
        saved = plan.saved_activation_bytes(meta, rows, image_tokens, text_tokens, size, size)
        lora_grads = plan.count_params(meta)["trainable"] * 4
        predicted = plan.activation_peak_bytes(saved, checkpointing) + lora_grads

        torch.manual_seed(0)
        transformer = QwenImageTransformer2DModel(**config)
        params = qi.add_lora(transformer, 8, 8, qi.RECIPE_LORA_TARGETS)
        if old:
            add_old_adapter(transformer)
        qi.set_gradient_checkpointing(transformer, checkpointing)
        x = torch.randn(rows, image_tokens, 64)
        embeds = torch.randn(rows, text_tokens, 32)
        sigmas = torch.rand(rows)

        def micro_batch():
            with torch.no_grad(), qi.lora_disabled(transformer):
                reference = qi.predict_velocity(transformer, x, sigmas, embeds, None, size, size)
            if old:
                with torch.no_grad(), adapter_active(transformer, OLD_ADAPTER):
                    reference = reference + qi.predict_velocity(transformer, x, sigmas, embeds, None, size, size)
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
        cases.append(dict(size=size, rows=rows, checkpointing=checkpointing, old=old, predicted=predicted,
                          measured=min(measured)))
    return cases


def group_cases(plan):
    """A group objective's smallest micro-batch: one whole group of K = 8 rows, with the old adapter's
    forward (NFT, AWM), checkpointed as in the recipe: the planner's activations at K rows."""
    return micro_batch_cases(plan, ((512, 30, 8, True, True),))


class ResidentAfterEachOp(TorchDispatchMode):
    """The peak over ops of the resident set right after each op returns: live tensors as the OS
    sees them at op boundaries (a kernel's own workspace, freed before it returns, is not in it)."""

    def __init__(self):
        super().__init__()
        self.start = resident("VmRSS")
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, resident("VmRSS") - self.start)
        return out


def vae_cases(plan):
    """The tiny pipeline's VAE architecture (qwen_image.build_tiny_pipeline) at two widths, in fp32:
    plan.vae_decode_peak_bytes traced on the meta device against the decode measured on the CPU
    (the peak rise of the resident set over op boundaries, and, for the record, the plain peak,
    which also holds CPU conv3d's im2col workspace)."""
    from diffusers import AutoencoderKLQwenImage

    cases = []
    for base_dim, batch, size in ((16, 2, 256), (32, 1, 256)):
        kw = dict(base_dim=base_dim, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                  temperal_downsample=[False, True, True])
        with torch.device("meta"):
            predicted = plan.vae_decode_peak_bytes(AutoencoderKLQwenImage(**kw), batch, size, size)
        torch.manual_seed(0)
        vae = AutoencoderKLQwenImage(**kw).eval()
        z = torch.randn(batch, 16, 1, size // 8, size // 8)
        measured, peak = [], []
        with torch.no_grad():
            vae.decode(z, return_dict=False)  # first call: one-time allocations
            for _ in range(2):
                before = resident("VmRSS")
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                with ResidentAfterEachOp() as tracker:
                    vae.decode(z, return_dict=False)
                measured.append(tracker.peak)
                peak.append(resident("VmHWM") - before)
        cases.append(dict(base_dim=base_dim, batch=batch, size=size, predicted=predicted, measured=min(measured),
                          peak_with_workspace=min(peak)))
    return cases


def weight_cases(plan):
    """The resident set added by policy.add_old_adapter (planner: the trainable LoRA's fp32 bytes)
    and by full mode's reference copy of the fp32 policy (planner: base parameters x 4 bytes, even
    when --dtype is bfloat16), on a 2-block model of width 512."""
    from diffusers import QwenImageTransformer2DModel

    from policy import add_old_adapter

    config = dict(CONFIG, attention_head_dim=64, num_attention_heads=8, axes_dims_rope=(16, 24, 24))
    meta = plan.build_meta_transformer(config, "lora", 64, 64, qi.RECIPE_LORA_TARGETS, torch.bfloat16)
    params = plan.count_params(meta)
    torch.manual_seed(0)
    transformer = QwenImageTransformer2DModel(**config).to(torch.bfloat16)
    qi.add_lora(transformer, 64, 64, qi.RECIPE_LORA_TARGETS)
    for p in transformer.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # cast_training_params, as the planner's meta model
    before = resident("VmRSS")
    add_old_adapter(transformer)
    old = resident("VmRSS") - before

    full = QwenImageTransformer2DModel(**config).to(torch.bfloat16).to(torch.float32)  # what Policy does in full mode
    before = resident("VmRSS")
    reference = qi.make_frozen_reference(full)
    copy = resident("VmRSS") - before
    del reference
    return [dict(what="old_adapter", predicted=params["trainable_bytes"], measured=old),
            dict(what="frozen_reference_copy", predicted=params["base"] * 4, measured=copy,
                 at_dtype=params["base"] * 2)]


if __name__ == "__main__":
    main(*sys.argv[1:])
