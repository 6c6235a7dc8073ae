import base64
import io
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

import rewards
import rewards_models
from rewards import build_reward, ocr_score, ocr_score_strict, ocr_target

WORDS = ["Hello World", "Open 24 Hours", "Coffee Shop", "SALE 50%", "Morning", "Quantum Leap"]


def render(text, size=512, font_size=48, noise=0.0, seed=0):
    image = Image.new("RGB", (size, size), (250, 250, 245))
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=font_size)
    width = draw.textlength(text, font=font)
    draw.text(((size - width) / 2, size / 2 - font_size / 2), text, fill=(10, 10, 10), font=font)
    if noise:
        rng = np.random.default_rng(seed)
        pixels = np.asarray(image, dtype=np.float64) + rng.normal(0, noise, (size, size, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def prompt_for(text):
    return f'A storefront with a sign that says "{text}" in bold letters'


# ---------------------------------------------------------------------------------- target and score

def test_ocr_target():
    flow_grpo = 'A vintage poster with the words "Grand Opening" written in gold, "second" quote'
    assert ocr_target(flow_grpo) == flow_grpo.split('"')[1] == "Grand Opening"
    assert ocr_target("no quotes at all") is None
    assert ocr_target('an unclosed "quote') is None
    assert ocr_target('empty "" quotes') == ""
    assert ocr_target("typographic \u201cCafé Ünïcode\u201d quotes") == "Café Ünïcode"
    assert ocr_target('first \u201ctypographic\u201d then "ascii"') == "typographic"
    assert ocr_target('a sign "  spaced  out  "') == "  spaced  out  "


def test_ocr_score():
    assert ocr_score("Hello World", "hello world") == 1.0
    assert ocr_score("the sign says HELLOWORLD!", "Hello World") == 1.0  # substring, whitespace-free
    assert ocr_score("Helo Wrld", "Hello World") == pytest.approx(1 - 2 / 10)
    assert ocr_score("", "Hello") == 0.0
    assert ocr_score("completely different and much longer text", "abc") == 0.0  # distance capped
    assert ocr_score("", "") == 1.0 and ocr_score("x", "") == 0.0
    assert ocr_score("ｃａｆé", "Café") == 1.0  # NFKC folds full-width letters
    assert ocr_score("Cafe\u0301", "Café") == 1.0  # and combining accents
    assert ocr_score_strict("the sign says hello", "hello") < 1.0
    assert ocr_score_strict("hello", "hello") == 1.0 and ocr_score_strict("", "") == 1.0
    assert 0.0 <= ocr_score_strict("abc", "xyz123") <= 1.0


def test_build_reward_rejects_unknown_names_and_prompts_without_target():
    with pytest.raises(ValueError, match="known: ocr, ocr_vlm"):
        build_reward("clip")
    with pytest.raises(ValueError, match="prompt 1 has no quoted text"):
        rewards._targets(['a "sign"', "a plain prompt"])


# ---------------------------------------------------------------------------------- PP-OCR

@pytest.fixture(scope="module")
def paddle_ocr(tmp_path_factory):
    return build_reward("ocr", cache_dir=str(tmp_path_factory.mktemp("ocr-cache")))


def test_paddle_ocr_reads_clean_text_and_scores_no_text_zero(paddle_ocr):
    images = [render(w) for w in WORDS]
    scores = paddle_ocr(images, [prompt_for(w) for w in WORDS])
    assert len(scores) == len(WORDS) and all(isinstance(s, float) for s in scores)
    assert np.mean(scores) >= 0.95
    blank = [Image.new("RGB", (512, 512), (250, 250, 245)), render("", noise=20)]
    assert paddle_ocr(blank, [prompt_for("Hello World")] * 2) == [0.0, 0.0]
    degraded = paddle_ocr([render(w, noise=25, seed=i) for i, w in enumerate(WORDS[:3])],
                          [prompt_for(w) for w in WORDS[:3]])
    assert np.mean(degraded) >= 0.9


def test_paddle_ocr_scores_misspellings_at_their_levenshtein_value(paddle_ocr):
    import Levenshtein

    cases = [("Helo Wrld", "Hello World"), ("Opem 42 Hours", "Open 24 Hours"), ("Cofee Shap", "Coffee Shop")]
    scores = paddle_ocr([render(shown) for shown, _ in cases], [prompt_for(target) for _, target in cases])
    for (shown, target), score in zip(cases, scores):
        a, b = shown.replace(" ", "").lower(), target.replace(" ", "").lower()
        assert score == pytest.approx(1 - Levenshtein.distance(a, b) / len(b), abs=0.05)


def test_paddle_ocr_keeps_its_cache_out_of_the_working_directory(paddle_ocr, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fresh = build_reward("ocr", cache_dir=str(tmp_path / "elsewhere"))
    fresh([render("Hi")], [prompt_for("Hi")])
    assert not (tmp_path / "cache").exists() and (tmp_path / "elsewhere").exists()


def engine_per_image(paddle_ocr, images) -> tuple[list[str], list[int]]:
    """The engine's own `ocr()` on each image alone (the reference the batched reward must equal):
    each image's joined text and its number of boxes."""
    engine = paddle_ocr._load()
    texts, boxes = [], []
    for image in images:
        lines = engine.ocr(np.ascontiguousarray(np.asarray(image)[:, :, ::-1]))[0] or []
        texts.append(" ".join(line[1][0] for line in lines))
        boxes.append(len(lines))
    return texts, boxes


def test_paddle_ocr_batched_detection_equals_the_engines_own_per_image_pipeline(paddle_ocr):
    """transcribe() detects the images of one size in one call; the engine's own ocr() runs one image
    at a time. Same detections, same crops, the same recogniser input per image: the same texts, for
    one-line, two-line (reading order), blank, noisy, small and wide (a line longer than the
    recogniser's 320/48) images."""
    two_lines = render("Coffee Shop")
    ImageDraw.Draw(two_lines).text((60, 60), "OPEN 9 TO 5", fill=(10, 10, 10), font=ImageFont.load_default(size=40))
    wide = [render(text, font_size=40) for text in ("Grand Opening Sale Today", "Fresh Bread Every Morning")]
    images = ([render(w) for w in WORDS] + [two_lines, Image.new("RGB", (512, 512), (250, 250, 245))]
              + [render(w, noise=40, seed=i) for i, w in enumerate(WORDS)]
              + [render(w, size=64, font_size=12) for w in ("CAT", "DOG", "Hi 2")] + wide)
    one_at_a_time, boxes = engine_per_image(paddle_ocr, images)
    assert paddle_ocr.transcribe(images) == one_at_a_time
    assert boxes[len(WORDS)] == 2 and one_at_a_time[len(WORDS)] == "OPEN 9 TO 5 Coffee Shop"  # top line first
    assert boxes[len(WORDS) + 1] == 0 and one_at_a_time[len(WORDS) + 1] == ""
    assert one_at_a_time[-2:] == ["Grand Opening Sale Today", "Fresh Bread Every Morning"]
    crops = [crop for image in wide for crop in paddle_ocr._load().text_detector(np.asarray(image)[:, :, ::-1].copy())]
    assert all(max(c[:, 0]) - min(c[:, 0]) > 320 / 48 * (max(c[:, 1]) - min(c[:, 1])) for c in crops)  # wide


def test_paddle_ocr_batched_detection_and_its_threads_change_no_text_world_score(paddle_ocr, tmp_path):
    """The text world's images (32x64, build_text_world.render) detected in one call per size, with
    blank and two-word (two boxes, 64x64) images among them, on 1 or 2 onnxruntime threads: the same
    texts and scores as the engine's own ocr() one image at a time."""
    import random

    import build_text_world as world

    rng, fonts = random.Random(0), world.load_fonts(32)
    words = world.WORDS[:20]
    images = [world.render(word, rng, fonts, 32, 64) for word in words]
    two_words = Image.new("RGB", (64, 64), (255, 255, 255))
    for top, word in ((0, "SUN"), (32, "BOX")):
        two_words.paste(world.render(word, rng, fonts, 32, 64, plain=True), (0, top))
    images[3:3] = [Image.new("RGB", (64, 32), (255, 255, 255)), two_words]
    images.append(Image.new("RGB", (64, 32), (250, 240, 205)))
    words[3:3] = ["CAT", "SUN BOX"]
    words.append("DOG")
    prompts = [f'A sign that says "{word}"' for word in words]
    one_at_a_time, boxes = engine_per_image(paddle_ocr, images)
    two_threads = build_reward("ocr", cache_dir=str(tmp_path), threads=2)
    assert paddle_ocr.transcribe(images) == one_at_a_time == two_threads.transcribe(images)
    assert boxes[3:5] == [0, 2] and one_at_a_time[3] == one_at_a_time[-1] == "" and one_at_a_time[4] == "SUN BOX"
    assert sum(text == word for text, word in zip(one_at_a_time, words)) >= 15  # the world's words are read
    scores = [ocr_score(text, ocr_target(prompt)) for text, prompt in zip(one_at_a_time, prompts)]
    assert paddle_ocr(images, prompts) == scores == two_threads(images, prompts)
    import torch

    def session_threads(reward):
        models = (reward._load().text_detector, reward._load().text_recognizer)
        return [model.session.get_session_options().intra_op_num_threads for model in models]
    assert session_threads(paddle_ocr) == [torch.get_num_threads()] * 2 and session_threads(two_threads) == [2, 2]


def test_paddle_ocr_with_the_angle_classifier_batches_alike_and_reads_upside_down_text(tmp_path):
    """use_angle_cls=True: the classifier turns each image's crops, as the engine does; the same texts,
    and the upside-down sign reads right."""
    reward = build_reward("ocr", cache_dir=str(tmp_path), use_angle_cls=True)
    images = [render(w) for w in WORDS[:3]] + [render("Quantum Leap").rotate(180), render("", noise=20)]
    engine = reward._load()
    one_at_a_time = [" ".join(line[1][0] for line in (engine.ocr(np.asarray(image)[:, :, ::-1].copy())[0] or []))
                     for image in images]
    assert reward.transcribe(images) == one_at_a_time
    assert one_at_a_time[3] == "Quantum Leap" and one_at_a_time[4] == ""


# ---------------------------------------------------------------------------------- VLM

def _save_tiny_qwen3_vl(path, tokenizer):
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                          "<|vision_end|>")}
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, pad_token_id=tokenizer.pad_token_id,
                         rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[4, 2, 2],
                                              mrope_interleaved=True)),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=32,
                           patch_size=16, num_position_embeddings=64, deepstack_visual_indexes=[0]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    torch.manual_seed(0)
    Qwen3VLForConditionalGeneration(config).save_pretrained(path)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def tiny_vlm_dir(request, tmp_path_factory):
    """A tiny random VLM saved like a hub checkpoint with its tokenizer and a PIL image processor:
    Qwen2.5-VL (the tiny pipeline's text encoder, a full Qwen2_5_VLForConditionalGeneration) or
    Qwen3-VL (patch 16, deepstack), the reference recipe's reward model family."""
    import qwen_image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    path = tmp_path_factory.mktemp(request.param)
    pipe = qwen_image.build_tiny_pipeline(seed=0)
    if request.param == "qwen2_5_vl":
        pipe.text_encoder.save_pretrained(path)
    else:
        _save_tiny_qwen3_vl(path, pipe.tokenizer)
    pipe.tokenizer.save_pretrained(path)
    patch = 14 if request.param == "qwen2_5_vl" else 16
    Qwen2VLImageProcessorPil(patch_size=patch, temporal_patch_size=2, merge_size=2).save_pretrained(path)
    return request.param, str(path)


def test_vlm_reward_runs_the_real_code_path(tiny_vlm_dir):
    model_type, path = tiny_vlm_dir
    reward = build_reward("ocr_vlm", model=path, device="cpu", dtype="float32", batch_size=2,
                          max_new_tokens=8, image_pixels=64 * 64)
    images = [render(w, size=128, font_size=16) for w in WORDS[:3]]
    start = time.perf_counter()
    scores = reward(images, [prompt_for(w) for w in WORDS[:3]])
    elapsed = time.perf_counter() - start
    assert len(scores) == 3 and all(isinstance(s, float) and 0.0 <= s <= 1.0 for s in scores)
    texts = reward.transcribe(images)
    assert texts == reward.transcribe(images)  # greedy decoding is deterministic
    assert all(isinstance(t, str) for t in texts)
    assert reward._model.config.model_type == model_type
    print(f"tiny {model_type} OCR: {elapsed / 3:.3f} s/image")


# ---------------------------------------------------------------------------------- server

class OcrServer:
    """A chat-completions server on 127.0.0.1 that answers with PP-OCR's transcription of the image
    it receives; optionally fails its first `fail_first` requests with HTTP 503."""

    def __init__(self, ocr, fail_first=0):
        self.requests, self.fail_first, self.auth = 0, fail_first, []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests += 1
                server.auth.append(self.headers.get("Authorization"))
                if self.path != "/v1/chat/completions":
                    self.send_response(404), self.end_headers()
                    return
                if server.requests <= server.fail_first:
                    self.send_response(503), self.end_headers()
                    return
                content = body["messages"][0]["content"]
                url = next(c["image_url"]["url"] for c in content if c["type"] == "image_url")
                assert any(c.get("text") == rewards_models.OCR_QUESTION for c in content)
                image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                text = ocr.transcribe([image])[0]
                payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": text}}]}).encode()
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


def test_server_reward_against_a_real_local_server(paddle_ocr, monkeypatch):
    monkeypatch.setenv("OCR_SERVER_API_KEY", "secret-key-123")
    images = [render(w) for w in WORDS[:4]]
    prompts = [prompt_for(w) for w in WORDS[:4]]
    with OcrServer(paddle_ocr) as server:
        reward = build_reward("ocr_server", base_url=server.url, model="tiny", concurrency=4, timeout=30)
        scores = reward(images, prompts)
    assert scores == paddle_ocr(images, prompts)
    assert np.mean(scores) >= 0.95 and server.requests == 4
    assert server.auth == ["Bearer secret-key-123"] * 4
    assert "secret-key-123" not in repr(reward)


def test_server_reward_retries_then_succeeds(paddle_ocr):
    with OcrServer(paddle_ocr, fail_first=2) as server:
        reward = build_reward("ocr_server", base_url=server.url, model="tiny", concurrency=1, backoff=0.05,
                              max_retries=3)
        assert reward([render("Hello World")], [prompt_for("Hello World")]) == [1.0]
    assert server.requests == 3


def test_server_reward_without_server_fails_clearly_within_the_timeout():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    reward = build_reward("ocr_server", base_url=f"http://127.0.0.1:{port}/v1", timeout=2, max_retries=2,
                          backoff=0.05)
    start = time.perf_counter()
    with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}/v1/chat/completions.*3 attempt"):
        reward([render("Hi")], [prompt_for("Hi")])
    assert time.perf_counter() - start < 10


# ---------------------------------------------------------------------------------- learnable rewards

def test_jpeg_compressibility_and_brightness():
    flat = Image.new("RGB", (512, 512), (120, 130, 140))
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8))
    jpeg = build_reward("jpeg_compressibility")
    flat_score, noise_score = jpeg([flat, noise], ["", ""])
    assert flat_score > 0.95 and noise_score < 0.7 and flat_score > noise_score
    bright = build_reward("brightness")
    assert bright([Image.new("RGB", (8, 8), (255, 255, 255)), Image.new("RGB", (8, 8), (0, 0, 0)),
                   Image.new("RGB", (8, 8), (51, 102, 153))], None) == [1.0, 0.0, pytest.approx(0.4)]


# ---------------------------------------------------------------------------------- CLIP rewards

def save_tiny_clip(path, seed=0):
    """A tiny random CLIPModel with its processor (a byte-level BPE trained here, the PIL image
    processor), saved like a hub checkpoint: the same loading code as PickScore_v1 / CLIP-L."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.train_from_iterator([prompt_for(w) for w in WORDS] + ["a photo of a cat", "a red square"],
                            trainers.BpeTrainer(vocab_size=320, special_tokens=["<|startoftext|>", "<|endoftext|>"],
                                                show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split()) for m in model["merges"]]
    tokenizer = CLIPTokenizer(vocab=model["vocab"], merges=merges)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                                                    crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16, logit_scale_init_value=4.6052)  # exp = 100, PickScore_v1's learnt scale
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(path)
    processor.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny-clip"))


def clip_images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)) for _ in range(5)]


def test_pickscore_and_clipscore_are_scaled_cosines_of_the_clip_embeddings(tiny_clip_dir):
    import torch
    from transformers import AutoProcessor, CLIPModel

    images, prompts = clip_images(), [prompt_for(w) for w in WORDS[:5]]
    pick = build_reward("pickscore", model=tiny_clip_dir, processor=tiny_clip_dir, batch_size=2)
    clip = build_reward("clipscore", model=tiny_clip_dir, batch_size=8)
    pick_scores, clip_scores = pick(images, prompts), clip(images, prompts)
    # independently: normalised projected features, cosine per (image, its own prompt)
    model, processor = CLIPModel.from_pretrained(tiny_clip_dir).eval(), AutoProcessor.from_pretrained(tiny_clip_dir)
    with torch.no_grad():
        def features(out):
            out = out if isinstance(out, torch.Tensor) else out.pooler_output
            return torch.nn.functional.normalize(out, dim=-1)
        image_features = features(model.get_image_features(**processor(images=images, return_tensors="pt")))
        text_features = features(model.get_text_features(**processor(text=prompts, padding=True, return_tensors="pt")))
    cosine = (image_features * text_features).sum(-1)
    assert clip_scores == pytest.approx(cosine.tolist(), abs=1e-5)
    assert pick_scores == pytest.approx((100.0 * cosine).tolist(), rel=1e-4, abs=1e-3)
    assert all(-1 <= s <= 1 for s in clip_scores) and len(set(round(s, 6) for s in clip_scores)) == 5
    # the score depends on the prompt: the same image against another prompt scores differently
    assert clip(images[:1], [prompts[1]]) != clip_scores[:1]
    # batching does not change a score; bf16 is close to fp32
    assert clip([images[3]], [prompts[3]]) == pytest.approx(clip_scores[3:4], abs=1e-5)
    bf16 = build_reward("clipscore", model=tiny_clip_dir, dtype="bfloat16")(images, prompts)
    assert bf16 == pytest.approx(clip_scores, abs=0.05)


def test_weighted_reward_is_the_raw_weighted_sum_and_keeps_each_component(tiny_clip_dir):
    images = clip_images()[:3] + [Image.new("RGB", (8, 8), (255, 255, 255))]
    prompts = [prompt_for(w) for w in WORDS[:4]]
    fn = build_reward("brightness:1.0,clipscore:0.5", clipscore={"model": tiny_clip_dir})
    combined, parts = rewards.score_components(fn, images, prompts)
    assert set(parts) == {"brightness", "clipscore"} and fn(images, prompts) == combined
    assert parts["brightness"] == rewards.brightness(images) and parts["brightness"][3] == 1.0
    assert parts["clipscore"] == build_reward("clipscore", model=tiny_clip_dir)(images, prompts)
    assert combined == pytest.approx([b + 0.5 * c for b, c in zip(parts["brightness"], parts["clipscore"])])
    # a zero weight: computed and reported, not trained on
    monitor = build_reward("brightness,clipscore:0", clipscore={"model": tiny_clip_dir})
    assert monitor(images, prompts) == parts["brightness"]
    assert rewards.score_components(rewards.brightness, images, prompts) == (parts["brightness"], {})
    assert rewards.parse_reward_spec("ocr:1.0, pickscore:0.2") == [("ocr", 1.0), ("pickscore", 0.2)]
    assert rewards.uses_ocr_target("brightness,ocr:0.5") and not rewards.uses_ocr_target("pickscore")
    for bad, message in [("ocr:x", "not a number"), ("ocr:-1", ">= 0"), ("ocr:nan", "finite"), ("ocr,ocr", "twice"),
                         ("ocr:0", "at least one"), ("ocr:1,pick", "unknown reward 'pick'"), ("", "unknown reward")]:
        with pytest.raises(ValueError, match=message):
            rewards.parse_reward_spec(bad)
    with pytest.raises(ValueError, match="keyed by component name"):
        build_reward("brightness,clipscore:0.5", model=tiny_clip_dir)


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never answers (a hung inference server)."""

    def __enter__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.sock.close()


def test_server_reward_that_never_answers_fails_at_the_deadline(capsys):
    """Today's code waits timeout x (max_retries + 1) per image and says nothing; the deadline bounds
    the whole call and names the URL."""
    with SilentServer() as server:
        reward = build_reward("ocr_server", base_url=server.url, timeout=2, max_retries=3, backoff=0.05,
                              concurrency=2, deadline=1.5, progress_every=0.5)
        start = time.perf_counter()
        with pytest.raises(TimeoutError, match="127.0.0.1:.*/v1/chat/completions: .*deadline of 1.5 s"):
            reward([render("Hi")] * 4, [prompt_for("Hi")] * 4)
        assert time.perf_counter() - start < 3
    assert "waiting for OCR server http://127.0.0.1:" in capsys.readouterr().out


def test_ctrl_c_interrupts_a_hung_server_reward():
    import signal

    with SilentServer() as server:
        reward = build_reward("ocr_server", base_url=server.url, timeout=3, max_retries=1, concurrency=1)
        previous = signal.signal(signal.SIGINT, signal.default_int_handler)
        timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
        start = time.perf_counter()
        try:
            timer.start()
            with pytest.raises(KeyboardInterrupt):
                reward([render("Hi")] * 2, [prompt_for("Hi")] * 2)
            elapsed = time.perf_counter() - start
        finally:
            timer.cancel()
            signal.signal(signal.SIGINT, previous)
    assert elapsed < 1.5
