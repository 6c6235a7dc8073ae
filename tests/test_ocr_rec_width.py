"""PaddleOcrReward's rec_min_width: the recogniser's inputs really narrow (its session's input shapes
are observed), the default still pads to 320, and clean text-world words read the same."""

import json
import random

import pytest
from PIL import Image, ImageDraw, ImageFont

import build_text_world as world
import rewards
from rewards import build_reward


def recogniser_widths(reward, images) -> tuple[list[str], list[tuple]]:
    """(texts, the shape of each batch the recogniser's model ran on)."""
    recogniser = reward._load().text_recognizer
    shapes = []
    run = recogniser.run

    def observed(output_name, input_feed):
        shapes.append(next(iter(input_feed.values())).shape)
        return run(output_name, input_feed=input_feed)

    recogniser.run = observed  # the engine calls self.run, so the instance attribute is what runs
    try:
        return reward.transcribe(images), shapes
    finally:
        del recogniser.run


def long_line() -> Image.Image:
    """One word much wider than 320/48: its crop sets the width above any floor."""
    image = Image.new("RGB", (640, 64), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    draw.text((12, 10), "INTERNATIONALISATION", fill=(0, 0, 0), font=ImageFont.load_default(size=40))
    return image


@pytest.fixture(scope="module")
def world_images():
    rng, fonts = random.Random(0), world.load_fonts(32)
    images = [world.render(word, rng, fonts, 32, 64) for word in world.WORDS[:16]]
    two_words = Image.new("RGB", (64, 64), (255, 255, 255))  # two crops recognised in one batch
    for top, word in ((0, "SUN"), (32, "BOX")):
        two_words.paste(world.render(word, rng, fonts, 32, 64, plain=True), (0, top))
    return images + [two_words]


@pytest.fixture(scope="module")
def default_ocr(tmp_path_factory):
    return build_reward("ocr", cache_dir=str(tmp_path_factory.mktemp("ocr-cache")))


def test_narrow_recogniser_inputs_read_the_default_texts(default_ocr, world_images, tmp_path):
    narrow = build_reward("ocr", cache_dir=str(tmp_path), **json.loads('{"rec_min_width": 48}'))  # as reward_kwargs
    default_texts, default_shapes = recogniser_widths(default_ocr, world_images)
    narrow_texts, narrow_shapes = recogniser_widths(narrow, world_images)
    assert {shape[2:] for shape in default_shapes} == {(48, 320)}
    widths = [shape[3] for shape in narrow_shapes]
    assert len(narrow_shapes) == len(default_shapes) and all(48 <= width < 160 for width in widths), widths
    assert [shape[0] for shape in narrow_shapes] == [shape[0] for shape in default_shapes]  # same batches
    assert narrow_texts == default_texts
    assert sum(text == word for text, word in zip(default_texts, world.WORDS)) >= 12  # the words are read
    assert default_texts[-1] == "SUN BOX"


def test_a_crop_wider_than_the_floor_runs_at_its_own_width_either_way(default_ocr, tmp_path):
    narrow = build_reward("ocr", cache_dir=str(tmp_path), rec_min_width=96)
    default_texts, default_shapes = recogniser_widths(default_ocr, [long_line()])
    narrow_texts, narrow_shapes = recogniser_widths(narrow, [long_line()])
    assert narrow_shapes == default_shapes and default_shapes[0][3] > 320
    assert narrow_texts == default_texts == ["INTERNATIONALISATION"]


def test_rec_min_width_is_checked_and_the_default_engine_gets_no_shape():
    assert rewards.PaddleOcrReward()._rec_shape() == {}
    assert rewards.PaddleOcrReward(rec_min_width=96)._rec_shape() == {"rec_image_shape": "3, 48, 96"}
    for bad in (0, 4, 96.0, "96", True):
        with pytest.raises(ValueError, match="rec_min_width"):
            rewards.PaddleOcrReward(rec_min_width=bad)
