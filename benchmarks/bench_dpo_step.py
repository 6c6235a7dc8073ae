"""One Diffusion-DPO update against one plain flow-matching (SFT) update on the same 2P samples.

    python benchmarks/bench_dpo_step.py [--model tiny-bench] [--size 256] [--pairs 2] [--repeats 7]

DPO = policy forward + backward on 2P samples + the reference forward without grad (LoRA disabled);
SFT = policy forward + backward on the same 2P samples. Both through policy.Policy's own
code (predict_velocity, lora_disabled, the loss), variants interleaved, medians reported.
Peak memory: CUDA's allocator peak on a GPU; on a CPU, the peak resident-set growth (sampled) of a
fresh process running one update (each variant in its own processes, median over repeats).
Last line: a JSON object with dpo_over_sft_time and dpo_over_sft_peak_mem.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def build(args):
    import torch

    import qwen_image as qi

    device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = qi.load_pipeline(args.model, dtype=torch.float32 if device == "cpu" else torch.bfloat16, device=device)
    transformer = pipe.transformer
    if args.mode == "lora":
        qi.add_lora(transformer, rank=args.rank, alpha=args.rank)
        reference = None
    else:
        reference = qi.make_frozen_reference(transformer)
        transformer.requires_grad_(True)
        for name in qi.dead_text_stream_modules(transformer):
            transformer.get_submodule(name).requires_grad_(False)
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    g = torch.Generator().manual_seed(0)
    n, seq = 2 * args.pairs, (args.size // 16) ** 2
    x0 = torch.randn(n, seq, 64, generator=g).to(device)
    noise = torch.randn(n, seq, 64, generator=g).repeat_interleave(1, 0).to(device)
    sigmas = torch.rand(n, generator=g).to(device)
    cache = qi.PromptCache(pipe, 256)
    embeds, mask = cache([f'A sign that says "Bench {i // 2}"' for i in range(n)], device=device,
                         dtype=transformer.dtype)
    return pipe, transformer, reference, optimizer, (x0, noise, sigmas, embeds, mask)


def one_update(variant, args, transformer, reference, optimizer, batch):
    import torch

    import qwen_image as qi
    from dpo_loss import diffusion_dpo_loss, flow_matching_sft_loss, noisy_latents, velocity_target

    x0, noise, sigmas, embeds, mask = batch
    xs, target = noisy_latents(x0, noise, sigmas), velocity_target(x0, noise)
    if variant == "dpo":
        with torch.no_grad():
            if reference is None:
                with qi.lora_disabled(transformer):
                    ref = qi.predict_velocity(transformer, xs, sigmas, embeds, mask, args.size, args.size)
            else:
                ref = qi.predict_velocity(reference, xs, sigmas, embeds, mask, args.size, args.size)
        pred = qi.predict_velocity(transformer, xs, sigmas, embeds, mask, args.size, args.size)
        loss, _ = diffusion_dpo_loss(pred, ref, target, 100.0)
    else:
        pred = qi.predict_velocity(transformer, xs, sigmas, embeds, mask, args.size, args.size)
        loss = flow_matching_sft_loss(pred, target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_child(args):
    """Runs in a fresh process (the allocator keeps freed memory, so a second update would reuse
    it): peak resident growth during one update of args.variant, sampled every 0.5 ms."""
    import threading

    import torch

    torch.set_num_threads(args.threads)
    _, transformer, reference, optimizer, batch = build(args)
    before, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    one_update(args.variant, args, transformer, reference, optimizer, batch)
    done.set()
    sampler.join()
    print(json.dumps({"peak_growth": max(peak[0], rss_bytes()) - before}))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-bench")
    parser.add_argument("--mode", default="lora", choices=["lora", "full"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        return memory_child(args)

    import torch

    torch.set_num_threads(args.threads)
    _, transformer, reference, optimizer, batch = build(args)
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times, peaks = {"dpo": [], "sft": []}, {"dpo": [], "sft": []}
    for variant in ("dpo", "sft"):  # warm-up
        one_update(variant, args, transformer, reference, optimizer, batch)
    for _ in range(args.repeats):
        for variant in ("dpo", "sft"):  # interleaved
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            sync()
            start = time.perf_counter()
            one_update(variant, args, transformer, reference, optimizer, batch)
            sync()
            times[variant].append(time.perf_counter() - start)
            if cuda:
                peaks[variant].append(torch.cuda.max_memory_allocated() - base)
    if not cuda:  # fresh processes, interleaved
        for _ in range(max(3, args.repeats // 2)):
            for variant in ("dpo", "sft"):
                cmd = [sys.executable, __file__, "--variant", variant] + [
                    f"--{k}={v}" for k, v in vars(args).items() if k not in ("variant", "repeats")]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
                peaks[variant].append(json.loads(out)["peak_growth"])
    med = {k: statistics.median(v) for k, v in times.items()}
    mem = {k: statistics.median(v) for k, v in peaks.items()}
    print(json.dumps({
        "model": args.model, "mode": args.mode, "size": args.size, "pairs": args.pairs, "device": "cuda" if cuda else "cpu",
        "threads": args.threads, "dpo_s": round(med["dpo"], 4), "sft_s": round(med["sft"], 4),
        "dpo_peak_mem_mb": round(mem["dpo"] / 2**20, 1), "sft_peak_mem_mb": round(mem["sft"] / 2**20, 1),
        "dpo_over_sft_time": round(med["dpo"] / med["sft"], 3),
        "dpo_over_sft_peak_mem": round(mem["dpo"] / mem["sft"], 3),
    }))


if __name__ == "__main__":
    main()
