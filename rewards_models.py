"""The model and server back ends of rewards.py, which loads this module on first use of one of them:
the OCR transcribers `VlmOcr` (a local Qwen2.5-VL / Qwen3-VL) and `ServerOcr` (an OpenAI-compatible
server), scored by rewards.py as its OCR reward, and `ClipReward` (PickScore, CLIPScore).

Imports nothing from this project (rewards.py and this file are copied together); transformers and
torch load lazily, once.
"""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import queue
import threading
import time
import urllib.error
import urllib.request

from PIL import Image

OCR_QUESTION = "Please output only the text content from the image without any additional descriptions or formatting."


class VlmOcr:
    """A Qwen2.5-VL / Qwen3-VL checkpoint (local path or hub id) asked OCR_QUESTION; greedy decoding,
    batched. The processor is assembled from the tokenizer and the PIL image processor (the
    torchvision-based fast processors are not needed), with images resized to a fixed pixel count so
    that every image of a batch gets the same number of vision tokens."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "bfloat16", batch_size: int = 8,
                 max_new_tokens: int = 64, image_pixels: int = 448 * 448):
        self.model_path, self.device, self.dtype = model, device, dtype
        self.batch_size, self.max_new_tokens, self.image_pixels = batch_size, max_new_tokens, image_pixels
        self._model = None

    def _load(self):
        if self._model is None:
            import torch
            from transformers import AutoModelForImageTextToText, AutoTokenizer
            from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

            self._tokenizer = AutoTokenizer.from_pretrained(self.model_path, padding_side="left")
            self._image_processor = Qwen2VLImageProcessorPil.from_pretrained(self.model_path)
            self._model = AutoModelForImageTextToText.from_pretrained(
                self.model_path, dtype=getattr(torch, self.dtype)).to(self.device).eval()
        return self._model

    def _inputs(self, images):
        proc = self._image_processor
        side = proc.patch_size * proc.merge_size
        edge = max(side, int(round(self.image_pixels ** 0.5 / side)) * side)
        images = [im.convert("RGB").resize((edge, edge), Image.BICUBIC) for im in images]
        vision = proc(images=images, return_tensors="pt")
        n_tokens = int(vision["image_grid_thw"][0].prod()) // proc.merge_size ** 2
        text = ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * n_tokens + "<|vision_end|>"
                + OCR_QUESTION + "<|im_end|>\n<|im_start|>assistant\n")
        tokens = self._tokenizer([text] * len(images), return_tensors="pt", padding=True)
        return {**tokens, **vision}

    def transcribe(self, images: list[Image.Image]) -> list[str]:
        import torch

        model = self._load()
        texts = []
        for start in range(0, len(images), self.batch_size):
            inputs = {k: v.to(self.device) for k, v in self._inputs(images[start:start + self.batch_size]).items()}
            with torch.no_grad():
                out = model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                     pad_token_id=self._tokenizer.pad_token_id)
            new_tokens = out[:, inputs["input_ids"].shape[1]:]
            texts += self._tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return texts


class ServerOcr:
    """OCR_QUESTION to an OpenAI-compatible chat-completions server (e.g. `vllm serve
    Qwen/Qwen3-VL-8B-Instruct`). base_url / model default to $OCR_SERVER_URL / $OCR_SERVER_MODEL;
    the API key comes from $OCR_SERVER_API_KEY (or $OPENAI_API_KEY) only and is never logged.
    Requests run concurrently; each has a timeout; failures (connection errors, 429, 5xx) are
    retried with exponential backoff, then raise RuntimeError naming the URL. One call waits at most
    `deadline` seconds over all its requests and retries (then TimeoutError naming the URL), says
    every `progress_every` seconds what it is waiting for, and Ctrl-C interrupts it at once; so does
    `cancelled` being set (rewards.CALLS_CANCELLED: a trainer's stop signal, which reaches a call on a
    worker thread this way)."""

    def __init__(self, base_url: str | None = None, model: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 1.0, concurrency: int = 16, max_tokens: int = 128,
                 deadline: float = 600.0, progress_every: float = 30.0, cancelled: threading.Event | None = None):
        self.base_url = (base_url or os.environ.get("OCR_SERVER_URL") or "http://127.0.0.1:8000/v1").rstrip("/")
        self.model = model or os.environ.get("OCR_SERVER_MODEL") or "Qwen/Qwen3-VL-8B-Instruct"
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.concurrency, self.max_tokens = concurrency, max_tokens
        self.cancelled = cancelled or threading.Event()
        # one call (all its images, all retries) never waits longer than `deadline` seconds
        self.deadline, self.progress_every = deadline, progress_every

    def __repr__(self):  # no key in logs
        return f"ServerOcrReward(base_url={self.base_url!r}, model={self.model!r})"

    @property
    def url(self) -> str:
        return self.base_url + "/chat/completions"

    @property
    def request_limit(self) -> float:
        """Seconds one image's request can take before it fails for good: max_retries + 1 attempts of
        up to `timeout` each with the backoff sleeps between them, capped by `deadline` (the whole call's
        limit). With the defaults: 4 x 60 + 1 + 2 + 4 = 247 s, well before the 600 s deadline."""
        retries = self.timeout * (self.max_retries + 1) + self.backoff * (2 ** self.max_retries - 1)
        return min(self.deadline, retries)

    def _limits(self) -> str:
        return (f"each image gives up after {self.request_limit:g} s ({self.max_retries + 1} attempt(s) of up to "
                f"{self.timeout:g} s: reward kwargs timeout, max_retries, backoff), the call after {self.deadline:g} s "
                "(deadline)")

    def probe(self, timeout: float = 5.0) -> str | None:
        """One bounded TCP connection to the server (no request, nothing scored): None when it accepts,
        else what failed, in one line. Run before any model loads, so that a server that is down or a
        wrong base_url fails in seconds, not after the pipeline loads and the first rollout."""
        import socket
        import urllib.parse

        parts = urllib.parse.urlsplit(self.base_url)
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
            with socket.create_connection((parts.hostname or "", port), timeout=timeout):
                pass
        except (OSError, ValueError) as error:
            return (f"OCR server {self.base_url} cannot be reached ({type(error).__name__}: {error}); start it, or "
                    "point reward_kwargs base_url / $OCR_SERVER_URL at it")
        return None

    def _request(self, image: Image.Image, give_up_at: float = float("inf")) -> str:
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
        data_url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        body = json.dumps({
            "model": self.model, "temperature": 0.0, "max_tokens": self.max_tokens,
            "messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": data_url}},
                {"type": "text", "text": OCR_QUESTION}]}],
        }).encode()
        headers = {"Content-Type": "application/json"}
        key = os.environ.get("OCR_SERVER_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if key:
            headers["Authorization"] = "Bearer " + key
        last_error = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), max(0.0, give_up_at - time.monotonic())))
            remaining = give_up_at - time.monotonic()
            if remaining <= 0:  # the call's deadline: no further attempt
                last_error = last_error or "deadline reached"
                break
            try:
                request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=min(self.timeout, remaining)) as response:
                    return json.loads(response.read())["choices"][0]["message"]["content"] or ""
            except urllib.error.HTTPError as error:
                last_error = f"HTTP {error.code}"
                if error.code != 429 and error.code < 500:
                    break  # a client error does not get better by retrying
            except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as error:
                last_error = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
        if time.monotonic() >= give_up_at:
            raise TimeoutError(f"OCR server {self.url}: no answer by the deadline of {self.deadline:g} s (reward kwarg "
                               f"`deadline`; last error: {last_error})")
        raise RuntimeError(f"OCR server {self.url} failed after {attempt + 1} attempt(s) of up to {self.timeout:g} s "
                           f"(reward kwargs timeout, max_retries): {last_error}")

    def transcribe(self, images: list[Image.Image]) -> list[str]:
        # Daemon worker threads (a hung request never holds up the process's exit) and a main thread
        # that waits in short slices, never in a blocking join: Ctrl-C (KeyboardInterrupt) reaches it
        # within a slice, and the deadline holds over all requests and retries together.
        start = time.monotonic()
        give_up_at = start + self.deadline
        futures = [concurrent.futures.Future() for _ in images]
        work, stop = queue.SimpleQueue(), threading.Event()
        for i in range(len(images)):
            work.put(i)

        def worker():
            while not stop.is_set():
                try:
                    i = work.get_nowait()
                except queue.Empty:
                    return
                try:
                    futures[i].set_result(self._request(images[i], give_up_at))
                except BaseException as error:  # handed to the waiting thread
                    futures[i].set_exception(error)

        for _ in range(min(self.concurrency, len(images))):
            threading.Thread(target=worker, daemon=True, name="ocr-server-request").start()
        try:
            pending, next_report = set(futures), start + self.progress_every
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=0.25,
                                                        return_when=concurrent.futures.FIRST_EXCEPTION)
                for future in done:
                    future.result()  # a request that failed for good raises here
                if self.cancelled.is_set():
                    raise RuntimeError(f"OCR server {self.url}: call cancelled (the run is stopping)")
                now = time.monotonic()
                if pending and now >= give_up_at:
                    raise TimeoutError(f"OCR server {self.url}: {len(pending)} of {len(images)} image(s) unanswered "
                                       f"at the deadline of {self.deadline:g} s (reward kwarg `deadline`)")
                if pending and now >= next_report:
                    print(f"waiting for OCR server {self.url}: {len(images) - len(pending)}/{len(images)} images "
                          f"answered, {now - start:.0f} s elapsed ({self._limits()})", flush=True)
                    next_report = now + self.progress_every
            return [future.result() for future in futures]
        finally:
            stop.set()  # on an error or Ctrl-C: no new requests; running ones end by the deadline



class ClipReward:
    """Image-text agreement of a CLIP model (transformers `CLIPModel`), batched.

    score = scale * cos(image_embeds, text_embeds), with the projected embeddings of the image and of
    its own prompt (truncated to the text model's 77 positions). `pickscore` uses the model's learnt
    logit scale (exp(logit_scale) = 100 for PickScore_v1, so scores sit around 18-23), as in the
    PickScore model card; `clipscore` uses scale 1, the raw cosine in [-1, 1] (Hessel et al.'s
    CLIPScore is 2.5 * max(cos, 0): the same ordering for positive similarities)."""

    def __init__(self, model: str, processor: str | None = None, device: str = "cpu", dtype: str = "float32",
                 batch_size: int = 32, use_logit_scale: bool = False):
        self.model_path, self.processor_path = model, processor or model
        self.device, self.dtype, self.batch_size, self.use_logit_scale = device, dtype, batch_size, use_logit_scale
        self._model = None

    def __repr__(self):
        return f"ClipReward(model={self.model_path!r}, processor={self.processor_path!r})"

    def _load(self):
        if self._model is None:
            import torch
            from transformers import AutoProcessor, CLIPModel

            self._processor = AutoProcessor.from_pretrained(self.processor_path)
            self._model = CLIPModel.from_pretrained(self.model_path, dtype=getattr(torch, self.dtype))
            self._model.to(self.device).eval()
        return self._model

    def __call__(self, images, prompts) -> list[float]:
        import torch

        model = self._load()
        max_length = model.config.text_config.max_position_embeddings
        scale = model.logit_scale.exp().item() if self.use_logit_scale else 1.0
        scores = []
        for start in range(0, len(images), self.batch_size):
            batch = [im.convert("RGB") for im in images[start:start + self.batch_size]]
            inputs = self._processor(text=list(prompts[start:start + len(batch)]), images=batch, padding=True,
                                     truncation=True, max_length=max_length, return_tensors="pt")
            inputs = {k: v.to(self.device) for k, v in inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.no_grad():
                out = model(**inputs)  # image_embeds / text_embeds [B, D], already L2-normalised
            cosine = (out.image_embeds.float() * out.text_embeds.float()).sum(-1)
            scores += (scale * cosine).tolist()
        return [float(s) for s in scores]
