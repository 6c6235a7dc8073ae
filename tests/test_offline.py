"""data_process/ (OCR prompts, synthetic pairs, Pick-a-Pic) and the offline trainer."""

import io
import json
import os
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import train_offline_dpo
from data_process import make_offline_pairs, pickapic_to_pairs, qwenimage_ocr
from pairs_format import PairsDataError, image_to_png_bytes, read_pairs, write_pairs


# ---------------------------------------------------------------------------------- OCR prompts

def write_lines(path, lines, raw=None):
    with open(path, "wb") as f:
        f.write(raw if raw is not None else "\n".join(lines).encode("utf-8"))


def test_ocr_prompts_to_parquet(tmp_path, capsys):
    src = tmp_path / "ocr"
    src.mkdir()
    write_lines(src / "train.txt", [
        'A sign that says "Open"', "", "   ", "A landscape with no text", 'A café menu reading "Crème brûlée 5€"',
        '  A mug with "Morning" on it  ', 'Typographic \u201cQuote\u201d only'])
    write_lines(src / "test.txt", [], raw='Poster "Jazz"\n'.encode() + b'bad \xff\xfe bytes "X"\n' + 'Cup "Tea"\n'.encode())
    assert qwenimage_ocr.main(["--input_dir", str(src), "--output_dir", str(tmp_path / "out")]) == 0
    err = capsys.readouterr().err
    assert "train.txt:4: no quoted text" in err and "test.txt:2: undecodable bytes" in err
    train = pq.read_table(tmp_path / "out" / "train.parquet")
    assert train.column_names == ["prompt", "ground_truth", "data_source", "split", "index"]
    rows = train.to_pylist()
    assert [r["prompt"] for r in rows] == ['A sign that says "Open"', 'A café menu reading "Crème brûlée 5€"',
                                           'A mug with "Morning" on it', "Typographic \u201cQuote\u201d only"]
    assert [r["ground_truth"] for r in rows] == ["Open", "Crème brûlée 5€", "Morning", "Quote"]
    assert [r["index"] for r in rows] == [0, 1, 2, 3] and {r["split"] for r in rows} == {"train"}
    assert all(r["ground_truth"] == r["prompt"].split('"')[1] for r in rows if '"' in r["prompt"])
    test = pq.read_table(tmp_path / "out" / "test.parquet").to_pylist()
    assert [r["ground_truth"] for r in test] == ["Jazz", "Tea"]
    # --strict turns the reports into an error; a missing split file is an error naming it
    assert qwenimage_ocr.main(["--input_dir", str(src), "--output_dir", str(tmp_path / "strict"), "--strict"]) == 2
    assert "train.txt:4" in capsys.readouterr().err and not (tmp_path / "strict" / "train.parquet").exists()
    os.remove(src / "test.txt")
    assert qwenimage_ocr.main(["--input_dir", str(src), "--output_dir", str(tmp_path / "o2")]) == 2
    assert "test.txt" in capsys.readouterr().err


# ---------------------------------------------------------------------------------- pairs format

def png(color, size=32):
    return image_to_png_bytes(Image.new("RGB", (size, size), color))


def pair_row(**kw):
    return {"prompt": "a red square", "chosen_image": png((200, 0, 0)), "rejected_image": png((0, 0, 200)),
            "chosen_score": 1.0, "rejected_score": 0.0, **kw}


def test_pairs_bad_input(tmp_path):
    write_pairs([pair_row(), pair_row(chosen_score=0.2, rejected_score=0.7)], str(tmp_path / "swapped.parquet"))
    with pytest.raises(PairsDataError, match="swapped.parquet: row 1: chosen_score 0.2 < rejected_score 0.7"):
        read_pairs(str(tmp_path / "swapped.parquet"))
    table = pa.table({"prompt": ["x"], "chosen_image": [b""], "chosen_score": [1.0], "rejected_score": [0.0]})
    pq.write_table(table, tmp_path / "missing.parquet")
    with pytest.raises(PairsDataError, match="missing.parquet: missing column.*rejected_image"):
        read_pairs(str(tmp_path / "missing.parquet"))
    write_pairs([pair_row(), pair_row(rejected_image=b"\x89PNG garbage"), pair_row()], str(tmp_path / "corrupt.parquet"))
    rows, counts = read_pairs(str(tmp_path / "corrupt.parquet"))
    assert counts == {"rows": 2, "corrupt_images_skipped": 1}
    with pytest.raises(PairsDataError, match="row 1: rejected_image is not a decodable image"):
        read_pairs(str(tmp_path / "corrupt.parquet"), strict=True)
    with pytest.raises(PairsDataError, match="does not exist"):
        read_pairs(str(tmp_path / "nope.parquet"))


class _Canary:
    def __reduce__(self):
        return (open, (os.environ["CANARY_PATH"], "w"))


def test_loading_never_unpickles(tmp_path, monkeypatch):
    """A pickle payload where image bytes or latents belong is never executed: the row is a corrupt
    image (skipped), latents are read as raw floats."""
    canary = tmp_path / "canary"
    monkeypatch.setenv("CANARY_PATH", str(canary))
    payload = pickle.dumps(_Canary())
    write_pairs([pair_row(chosen_image=payload), pair_row()], str(tmp_path / "p.parquet"))
    rows, counts = read_pairs(str(tmp_path / "p.parquet"))
    assert counts["corrupt_images_skipped"] == 1 and not canary.exists()
    padded = payload + b"\0" * (-len(payload) % 4)
    n = len(padded) // 4
    write_pairs([pair_row(chosen_latents=padded, rejected_latents=np.zeros(n, "<f4").tobytes(), latents_shape=[n],
                          height=64, width=64)], str(tmp_path / "l.parquet"))
    rows, _ = read_pairs(str(tmp_path / "l.parquet"))
    assert rows[0]["chosen_latents"].dtype == np.float32 and not canary.exists()
    write_pairs([pair_row(chosen_latents=padded, rejected_latents=padded, latents_shape=[n + 1], height=64, width=64)],
                str(tmp_path / "bad_shape.parquet"))
    with pytest.raises(PairsDataError, match="row 0: latents do not match latents_shape"):
        read_pairs(str(tmp_path / "bad_shape.parquet"))


def test_pickapic_conversion_drops_ties(tmp_path):
    red, blue = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(red, format="JPEG")
    Image.new("RGB", (16, 16), (0, 0, 255)).save(blue, format="JPEG")
    table = pa.table({"caption": ["a", "b", "c", "d"], "jpg_0": [red.getvalue()] * 4, "jpg_1": [blue.getvalue()] * 4,
                      "label_0": [1.0, 0.0, 0.5, 1.0], "label_1": [0.0, 1.0, 0.5, 0.0], "extra": [1, 2, 3, 4]})
    pq.write_table(table, tmp_path / "pickapic.parquet")
    out = str(tmp_path / "pairs.parquet")
    assert pickapic_to_pairs.main(["--input", str(tmp_path / "pickapic.parquet"), "--output", out]) == 0
    rows, _ = read_pairs(out)
    assert [r["prompt"] for r in rows] == ["a", "b", "d"]
    assert rows[0]["chosen_image"] == red.getvalue() and rows[1]["chosen_image"] == blue.getvalue()
    assert all(r["chosen_score"] == 1.0 and r["rejected_score"] == 0.0 for r in rows)
    counts = pickapic_to_pairs.convert(str(tmp_path / "pickapic.parquet"), out)
    assert counts == {"rows_in": 4, "pairs": 3, "ties_dropped": 1, "bad_label_dropped": 0, "corrupt_images_dropped": 0}
    pq.write_table(table.drop(["label_0"]), tmp_path / "bad.parquet")
    assert pickapic_to_pairs.main(["--input", str(tmp_path / "bad.parquet"), "--output", out]) == 2


# ---------------------------------------------------------------------------------- through `datasets`

def test_prompts_load_through_datasets_from_parquet_jsonl_txt_and_directories(tmp_path):
    import datasets

    import prompt_data
    from records import is_hub_id

    assert datasets.config.HF_DATASETS_OFFLINE  # tests never reach the Hub
    folder = tmp_path / "prompts"
    folder.mkdir()
    pq.write_table(pa.table({"prompt": ['a sign "OPEN"', 'a mug "CAFE"'], "ground_truth": ["OPEN", None]}),
                   folder / "a.parquet")
    (folder / "b.jsonl").write_text(json.dumps({"caption": 'a cap "HAT"'}) + "\n" + json.dumps({"caption": "a dog"}) + "\n")
    (folder / "c.txt").write_text('first "ONE"\n\n  second "TWO"  \n')
    (folder / "ignored.csv").write_text("prompt\nnot read\n")
    rows = prompt_data.load_prompts(str(folder))
    assert [r["prompt"] for r in rows] == ['a sign "OPEN"', 'a mug "CAFE"', 'a cap "HAT"', "a dog", 'first "ONE"',
                                           'second "TWO"']
    assert [r["uid"] for r in rows] == ["a.parquet:0", "a.parquet:1", "b.jsonl:0", "b.jsonl:1", "c.txt:1", "c.txt:3"]
    assert [r["ground_truth"] for r in rows[:3]] == ["OPEN", None, None]
    assert len(prompt_data.load_prompts(str(folder), max_rows=3)) == 3
    with pytest.raises(ValueError, match=r"b.jsonl: prompt has no quoted text|b.jsonl:1: prompt has no quoted text"):
        prompt_data.load_prompts(str(folder), need_ocr_target=True)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": " "}) + "\n")
    with pytest.raises(ValueError, match="bad.jsonl: row 1: empty or non-string prompt"):
        prompt_data.load_prompts(str(tmp_path / "bad.jsonl"))
    pq.write_table(pa.table({"title": ["x"]}), tmp_path / "nocol.parquet")
    with pytest.raises(ValueError, match=r"nocol.parquet: missing column 'prompt' \(has \['title'\]\)"):
        prompt_data.load_prompts(str(tmp_path / "nocol.parquet"))
    # Hub ids: recognised (validation accepts them), loaded through the same function when online
    assert is_hub_id("yuvalkirstain/pickapic_v2") and is_hub_id("someone/prompts:test")
    assert not is_hub_id("outputs/pairs.parquet") and not is_hub_id(str(folder)) and not is_hub_id("/abs/x")
    with pytest.raises(ValueError, match="someone/not-cached: cannot be read .*OfflineModeIsEnabled"):  # one line
        prompt_data.load_prompts("someone/not-cached")


def test_offline_trainer_reads_pickapic_rows_directly_ties_dropped_and_counted(tmp_path):
    red, blue = png((255, 0, 0)), png((0, 0, 255))
    labels = [1.0, 0.5, 0.0, 1.0, 0.5]
    pq.write_table(pa.table({"caption": list("abcde"), "jpg_0": [red] * 5, "jpg_1": [blue] * 5, "label_0": labels}),
                   tmp_path / "pickapic.parquet")
    rows, counts = read_pairs(str(tmp_path / "pickapic.parquet"))
    assert [r["prompt"] for r in rows] == ["a", "c", "d"] and counts == {
        "rows": 3, "corrupt_images_skipped": 0, "ties_dropped": 2, "bad_label_dropped": 0}
    assert rows[0]["chosen_image"] == red and rows[1]["chosen_image"] == blue
    rows, _ = read_pairs(str(tmp_path / "pickapic.parquet"), max_pairs=2)
    assert [r["prompt"] for r in rows] == ["a", "c"]
    assert pickapic_to_pairs.convert(str(tmp_path / "pickapic.parquet"), str(tmp_path / "out.parquet"), max_rows=3) == {
        "rows_in": 3, "pairs": 2, "ties_dropped": 1, "bad_label_dropped": 0, "corrupt_images_dropped": 0}
    config = train_offline_dpo.Config(pairs_path="yuvalkirstain/pickapic_v2", eval_data=str(tmp_path / "pickapic.parquet"),
                                      pretrained="tiny")  # offline: a Hub model id must be in the cache
    train_offline_dpo.validate(config)  # a Hub id passes validation; it is streamed at run time


def truncated_jpeg():
    """A real JPEG cut after 60 % of its bytes: PIL's verify() accepts it, decoding fails."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG", quality=90)
    data = buffer.getvalue()[: int(len(buffer.getvalue()) * 0.6)]
    with Image.open(io.BytesIO(data)) as image:
        image.verify()  # the check the importer used to rely on
    return data


def test_truncated_jpegs_and_nan_scores_are_caught_when_reading(tmp_path):
    write_pairs([pair_row(), pair_row(chosen_image=truncated_jpeg()), pair_row()], str(tmp_path / "cut.parquet"))
    rows, counts = read_pairs(str(tmp_path / "cut.parquet"))
    assert counts == {"rows": 2, "corrupt_images_skipped": 1}
    with pytest.raises(PairsDataError, match="cut.parquet: row 1: chosen_image is not a decodable image"):
        read_pairs(str(tmp_path / "cut.parquet"), strict=True)
    write_pairs([pair_row(), pair_row(chosen_score=float("nan"))], str(tmp_path / "nan.parquet"))
    with pytest.raises(PairsDataError, match="nan.parquet: row 1: non-finite score"):
        read_pairs(str(tmp_path / "nan.parquet"))
    # the Pick-a-Pic importer drops (and counts) such rows, or names them with --strict
    good = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(good, format="JPEG")
    table = pa.table({"caption": ["a", "b"], "jpg_0": [good.getvalue()] * 2, "jpg_1": [good.getvalue(), truncated_jpeg()],
                      "label_0": [1.0, 1.0]})
    pq.write_table(table, tmp_path / "pickapic.parquet")
    counts = pickapic_to_pairs.convert(str(tmp_path / "pickapic.parquet"), str(tmp_path / "pairs.parquet"))
    assert counts["pairs"] == 1 and counts["corrupt_images_dropped"] == 1
    with pytest.raises(PairsDataError, match="pickapic.parquet: row 1: image does not decode \\(jpg_1"):
        pickapic_to_pairs.convert(str(tmp_path / "pickapic.parquet"), str(tmp_path / "p2.parquet"), strict=True)


def test_data_ocr_is_ignored_by_git():
    """The README's output location for data_process/qwenimage_ocr.py must not end up in commits."""
    ignored = [line.strip() for line in open(os.path.join(os.path.dirname(__file__), "..", ".gitignore"))]
    assert "data/ocr/" in ignored


# ---------------------------------------------------------------------------------- generation and training

@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pairs") / "tiny.parquet")
    totals = make_offline_pairs.main(["--preset", "cpu_tiny", "--output", path])
    assert totals == {"prompts": 16, "pairs": 64, "groups_without_pair": 0}
    return path


def test_generated_pairs_are_consistent(tiny_pairs, tiny_dir):
    """Rows regenerate from their seeds: stored latents decode to the stored image, scores match."""
    import qwen_image as qi
    from rewards import brightness

    rows, _ = read_pairs(tiny_pairs)
    assert len(rows) == 64 and all(r["chosen_score"] > r["rejected_score"] for r in rows)
    pipe = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    row = rows[5]
    latents = torch.tensor(np.stack([row["chosen_latents"], row["rejected_latents"]]))
    decoded = qi.decode_latents(pipe, latents, 64, 64)
    assert np.array_equal(np.asarray(decoded[0]), np.asarray(Image.open(io.BytesIO(row["chosen_image"]))))
    assert brightness(decoded) == pytest.approx([row["chosen_score"], row["rejected_score"]], abs=1e-12)
    table = pq.read_table(tiny_pairs)
    assert table.schema.field("chosen_latents").type == pa.binary()
    assert table.column("latents_shape")[0].as_py() == [16, 64]


def test_offline_latents_are_encoded_when_the_file_has_none(tiny_pairs, tiny_dir, tmp_path):
    import qwen_image as qi

    rows, _ = read_pairs(tiny_pairs)
    rows = rows[:3]
    for r in rows:
        del r["chosen_latents"]
    pipe = qi.load_pipeline(tiny_dir, dtype=torch.float32)
    assert train_offline_dpo.load_pair_latents(pipe, rows, 64, 64) == 3
    expected = qi.encode_images(pipe, [Image.open(io.BytesIO(rows[1]["rejected_image"]))], 64, 64)
    assert rows[1]["latents"].shape == (2, 16, 64)
    torch.testing.assert_close(rows[1]["latents"][1], expected[0], atol=1e-5, rtol=0)  # other batch shape


@pytest.mark.slow
def test_offline_dpo_learns_and_reversed_pairs_unlearn(tiny_pairs, tmp_path):
    """Measured: eval brightness 0.5049 -> 0.5135 (30 steps); reversed -> 0.5002."""
    up, down = str(tmp_path / "up"), str(tmp_path / "down")
    train_offline_dpo.main(["--preset", "cpu_tiny", "--pairs_path", tiny_pairs, "--output_dir", up])
    train_offline_dpo.main(["--preset", "cpu_tiny", "--pairs_path", tiny_pairs, "--output_dir", down,
                            "--reverse_preference", "true"])
    read = lambda d: [json.loads(line) for line in open(os.path.join(d, "metrics.jsonl"))]
    ev = lambda d: [r["eval/reward_mean"] for r in read(d) if "eval/reward_mean" in r]
    assert ev(up)[-1] - ev(up)[0] > 0.006
    assert ev(down)[0] - ev(down)[-1] > 0.002
    assert os.path.isfile(os.path.join(up, "lora", "pytorch_lora_weights.safetensors"))
    steps = [r for r in read(up) if "dpo/loss" in r]
    assert len(steps) == 30 and steps[-1]["data/epoch"] > 6
    assert os.path.isdir(os.path.join(up, "checkpoint-30"))


@pytest.mark.slow
def test_offline_resume_is_exact(tiny_pairs, tmp_path, capsys):
    from safetensors.torch import load_file

    common = ["--preset", "cpu_tiny", "--pairs_path", tiny_pairs, "--max_steps", "6", "--eval_every", "0",
              "--checkpoint_every", "3"]
    train_offline_dpo.main(common + ["--output_dir", str(tmp_path / "a")])
    assert "64 pairs (0 VAE-encoded, 64 from stored latents) and 16 prompts prepared" in capsys.readouterr().out
    with pytest.raises(FileExistsError, match="already holds a run .*checkpoint-6"):  # a fresh run into it
        train_offline_dpo.main(common + ["--output_dir", str(tmp_path / "a")])
    train_offline_dpo.main(common + ["--output_dir", str(tmp_path / "b"), "--max_steps", "3"])
    train_offline_dpo.main(common + ["--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", "latest"])
    a = load_file(str(tmp_path / "a" / "lora" / "pytorch_lora_weights.safetensors"))
    b = load_file(str(tmp_path / "b" / "lora" / "pytorch_lora_weights.safetensors"))
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


@pytest.mark.parametrize("flag,value,field", [
    ("pairs_path", "/nonexistent.parquet", "pairs_path"), ("beta", "0", "beta"), ("micro_batch_pairs", "0", "micro_batch_pairs"),
    ("pairs_per_step", "0", "pairs_per_step"), ("reward", "nope", "reward"), ("width", "30", "width"),
])
def test_offline_config_validation(flag, value, field, tiny_pairs):
    with pytest.raises(ValueError, match=field):
        train_offline_dpo.main(["--preset", "cpu_tiny", "--pairs_path", tiny_pairs, f"--{flag}", value])


def test_make_pairs_config_validation():
    with pytest.raises(ValueError, match="samples_per_prompt"):
        make_offline_pairs.main(["--preset", "cpu_tiny", "--samples_per_prompt", "1", "--output", "/tmp/x.parquet"])
    with pytest.raises(ValueError, match="config field `output`: folder '/dev/null/pairs' is not writable"):
        make_offline_pairs.main(["--preset", "cpu_tiny", "--output", "/dev/null/pairs/x.parquet"])
