"""Reward overlap: one rollout + reward phase, sequential (sample every chunk, then score) against
overlapped (score chunk i on a worker thread while chunk i+1 is sampled: perf.OverlappedScorer), with
the `ocr_server` reward against a real HTTP server on 127.0.0.1 that takes a fixed time per image
(requests are served one at a time, like a saturated OCR server).

    python benchmarks/bench_reward_overlap.py [--model tiny-bench] [--images 24] [--chunk 4] [--size 128]
        [--steps 8] [--seconds_per_image auto]

The defaults (256 px, 4 steps, chunks of 2) keep the tiny model's Python overhead, which holds the
GIL, small against its kernels, which release it. `--seconds_per_image auto` sets the server's time so that the reward phase takes as long as the
rollout (the case where overlap helps most: the ideal is half the sequential time). Variants
interleaved; medians of --repeats. Prints overlapped / sequential and overlapped / max(rollout,
reward) (1.0 = perfect overlap; a pipeline of n chunks cannot beat 1 + 1/n when the two are equal),
and checks that both paths give the same rewards and latents.
Last line: a JSON object.
"""

import argparse
import base64
import io
import json
import os
import statistics
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


class SlowOcrServer:
    """An OpenAI-compatible chat-completions server on 127.0.0.1. Each request takes
    `seconds_per_image` (one request at a time) and answers with a deterministic function of the
    image: the first k letters of TARGET with k from the image's mean pixel value, so different
    images get different OCR rewards and any mix-up of order shows."""

    TARGET = "abcdefgh"

    def __init__(self, seconds_per_image: float = 0.0):
        self.seconds_per_image, self.requests = seconds_per_image, 0
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                import numpy as np
                from PIL import Image

                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                url = next(c["image_url"]["url"] for c in body["messages"][0]["content"] if c["type"] == "image_url")
                image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                k = int(np.asarray(image, dtype=np.float64).mean() * 1000) % (len(server.TARGET) + 1)
                with server.lock:  # one image at a time, a fixed time each
                    server.requests += 1
                    time.sleep(server.seconds_per_image)
                payload = json.dumps({"choices": [{"message": {"role": "assistant",
                                                               "content": server.TARGET[:k]}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def prompts_for(n: int) -> list[str]:
    return [f'A sign that says "{SlowOcrServer.TARGET}" on a wall, style {i % 4}' for i in range(n)]


def sequential(pipe, cache, prompts, seeds, settings, reward_fn):
    import qwen_image_rollout as qir

    latents, images = qir.rollout(pipe, cache, prompts, seeds, settings)
    return latents, [float(r) for r in reward_fn(images, prompts)]


def overlapped(pipe, cache, prompts, seeds, settings, reward_fn):
    import perf
    import qwen_image_rollout as qir

    def score(images, start):
        return reward_fn(images, prompts[start:start + len(images)])

    with perf.OverlappedScorer(score) as scorer:
        latents, _ = qir.rollout(pipe, cache, prompts, seeds, settings, on_chunk=scorer)
        return latents, scorer.results()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-bench")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=2)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--seconds_per_image", default="auto")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    import qwen_image as qi
    import qwen_image_rollout as qir
    from rewards import build_reward

    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()
    pipe = qi.load_pipeline(args.model, dtype=torch.bfloat16 if cuda else torch.float32,
                            device="cuda" if cuda else "cpu")
    prompts = prompts_for(args.images)
    seeds = list(range(args.images))
    settings = qir.RolloutSettings(height=args.size, width=args.size, num_inference_steps=args.steps,
                                  chunk_size=args.chunk)
    cache = qi.PromptCache(pipe, 256)
    with SlowOcrServer() as server:
        reward_fn = build_reward("ocr_server", base_url=server.url, model="slow", concurrency=4, timeout=60)
        qir.rollout(pipe, cache, prompts[:args.chunk], seeds[:args.chunk], settings)  # warm-up
        start = time.perf_counter()
        qir.rollout(pipe, cache, prompts, seeds, settings)
        rollout_s = time.perf_counter() - start
        server.seconds_per_image = (rollout_s / args.images if args.seconds_per_image == "auto"
                                    else float(args.seconds_per_image))
        start = time.perf_counter()
        reward_fn(pipe.image_processor.postprocess(torch.zeros(args.images, 3, args.size, args.size), output_type="pil"),
                  prompts)
        reward_s = time.perf_counter() - start

        times = {"sequential": [], "overlapped": []}
        results = {}
        for _ in range(args.repeats):
            for name, fn in (("sequential", sequential), ("overlapped", overlapped)):
                start = time.perf_counter()
                results[name] = fn(pipe, cache, prompts, seeds, settings, reward_fn)
                times[name].append(time.perf_counter() - start)
    identical = (torch.equal(results["sequential"][0], results["overlapped"][0])
                 and results["sequential"][1] == results["overlapped"][1])
    med = {k: statistics.median(v) for k, v in times.items()}
    ideal = max(rollout_s, reward_s)
    # a pipeline cannot hide the first chunk's sampling or the last chunk's scoring
    chunks = -(-args.images // args.chunk)
    bound = ideal + min(rollout_s, reward_s) / chunks
    print(f"rollout alone {rollout_s:.2f} s, reward alone {reward_s:.2f} s ({server.seconds_per_image * 1000:.0f} ms/image), "
          f"sequential {med['sequential']:.2f} s, overlapped {med['overlapped']:.2f} s; same rewards and latents: {identical}")
    print(json.dumps({
        "model": args.model, "images": args.images, "chunk": args.chunk, "size": args.size, "steps": args.steps,
        "rollout_s": round(rollout_s, 3), "reward_s": round(reward_s, 3),
        "seconds_per_image": round(server.seconds_per_image, 4),
        "sequential_s": round(med["sequential"], 3), "overlapped_s": round(med["overlapped"], 3),
        "overlapped_over_sequential": round(med["overlapped"] / med["sequential"], 3),
        "overlapped_over_max_rollout_reward": round(med["overlapped"] / ideal, 3),
        "pipeline_bound_s": round(bound, 3), "overlapped_over_pipeline_bound": round(med["overlapped"] / bound, 3),
        "identical_results": identical, "reward_mean": round(statistics.mean(results["overlapped"][1]), 4),
    }))


if __name__ == "__main__":
    main()
