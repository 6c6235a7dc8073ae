"""The accelerator and the few collectives the scripts use (sums, maxima, objects over ranks); with one
process they are plain values.
"""

from __future__ import annotations

import os

import torch


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
