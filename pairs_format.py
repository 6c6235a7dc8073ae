"""The preference-pairs parquet: one row per (chosen, rejected) pair. No pickles anywhere: images are
encoded image bytes (PNG written here; JPEG from Pick-a-Pic kept as is), latents raw little-endian
float32 bytes with their shape.

    prompt            string
    chosen_image      binary   encoded image (PNG / JPEG)
    rejected_image    binary
    chosen_score      float64  reward (or human label) of the chosen image; must be >= rejected_score
    rejected_score    float64
    chosen_seed       int64    rollout seed (-1 when unknown, e.g. human data)
    rejected_seed     int64
  optional, written by make_offline_pairs.py --store_latents:
    chosen_latents    binary   packed normalised latents [S, 64] as '<f4' bytes (qwen_image convention)
    rejected_latents  binary
    latents_shape     list<int64>  e.g. [1024, 64]
    height, width     int64    the image resolution the latents belong to
"""

from __future__ import annotations

import io
import math
import os

import numpy as np

REQUIRED_COLUMNS = ("prompt", "chosen_image", "rejected_image", "chosen_score", "rejected_score")
LATENT_COLUMNS = ("chosen_latents", "rejected_latents", "latents_shape", "height", "width")


class PairsDataError(ValueError):
    pass


def image_to_png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def latents_to_bytes(latents) -> bytes:
    return np.ascontiguousarray(latents.detach().cpu().float().numpy(), dtype="<f4").tobytes()


def latents_from_bytes(data: bytes, shape) -> np.ndarray:
    return np.frombuffer(data, dtype="<f4").reshape(tuple(int(s) for s in shape))


def write_pairs(rows: list[dict], path: str):
    """Writes the parquet atomically (temporary file, then rename)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {
        "prompt": pa.array([r["prompt"] for r in rows], pa.string()),
        "chosen_image": pa.array([r["chosen_image"] for r in rows], pa.binary()),
        "rejected_image": pa.array([r["rejected_image"] for r in rows], pa.binary()),
        "chosen_score": pa.array([float(r["chosen_score"]) for r in rows], pa.float64()),
        "rejected_score": pa.array([float(r["rejected_score"]) for r in rows], pa.float64()),
        "chosen_seed": pa.array([int(r.get("chosen_seed", -1)) for r in rows], pa.int64()),
        "rejected_seed": pa.array([int(r.get("rejected_seed", -1)) for r in rows], pa.int64()),
    }
    if rows and "chosen_latents" in rows[0]:
        columns["chosen_latents"] = pa.array([r["chosen_latents"] for r in rows], pa.binary())
        columns["rejected_latents"] = pa.array([r["rejected_latents"] for r in rows], pa.binary())
        columns["latents_shape"] = pa.array([list(r["latents_shape"]) for r in rows], pa.list_(pa.int64()))
        columns["height"] = pa.array([int(r["height"]) for r in rows], pa.int64())
        columns["width"] = pa.array([int(r["width"]) for r in rows], pa.int64())
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        pq.write_table(pa.table(columns), tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a folder at `path`, Ctrl-C: no half-written tmp file left behind
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise


def image_problem(data: bytes | None) -> str | None:
    """None if the bytes decode to a whole image, else why not. Decodes every pixel: verify() alone
    passes a truncated JPEG, which then fails in the trainer after the model has loaded."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data or b"")) as image:
            image.load()
    except Exception as error:  # PIL raises many types for bad bytes
        return f"{type(error).__name__}: {error}"
    return None


PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


def pair_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
        if not files:
            raise PairsDataError(f"no .parquet files in {path}")
        return files
    if not os.path.isfile(path):
        raise PairsDataError(f"pairs file {path} does not exist")
    return [path]


def open_pair_parts(path: str, split: str = "train", columns=None):
    """[(name, IterableDataset)] through `datasets` (records.py): a pairs parquet, a
    directory of them, or a Hub dataset id (streamed)."""
    from records import is_hub_id, open_parts

    if not is_hub_id(path):
        import pyarrow.parquet as pq

        for file in pair_files(path):  # "does not exist" / "no .parquet files" errors
            try:
                pq.read_schema(file)  # a damaged file is named here, not deep inside `datasets`
            except Exception as error:  # pyarrow raises several types for bad bytes
                raise PairsDataError(f"{file}: not a readable parquet file ({type(error).__name__}: {error})") from None
    return open_parts(path, split, extensions=(".parquet",), columns=columns)


def pickapic_pair(row: dict) -> dict | str:
    """A Pick-a-Pic v2 row (caption, jpg_0, jpg_1, label_0) -> a pair row, or "tie" (label 0.5) /
    "bad_label". label_0 = 1: jpg_0 preferred, 0: jpg_1 preferred; chosen scores 1.0, rejected 0.0."""
    from records import as_bytes

    label = row["label_0"]
    if label == 0.5:
        return "tie"
    if label not in (0, 1, 0.0, 1.0):
        return "bad_label"
    chosen, rejected = ("jpg_0", "jpg_1") if label == 1 else ("jpg_1", "jpg_0")
    return {"prompt": row["caption"], "chosen_image": as_bytes(row[chosen]), "rejected_image": as_bytes(row[rejected]),
            "chosen_score": 1.0, "rejected_score": 0.0, "chosen_seed": -1, "rejected_seed": -1}


def read_pairs(path: str, strict: bool = False, split: str = "train", max_pairs: int = 0) -> tuple[list[dict], dict]:
    """-> (rows, counts). Each row: prompt, chosen/rejected image bytes, scores, and the latents as
    numpy arrays when present. Reads the pairs format, or Pick-a-Pic v2 rows converted on the fly
    (ties dropped and counted): local files or a Hub dataset id (`split`, streamed; max_pairs > 0
    stops after that many pairs). A missing column or chosen_score < rejected_score is an error naming
    the file (and row); undecodable images skip the row (counted), or raise with strict."""

    from records import as_bytes, column_names

    rows = []
    counts = {"rows": 0, "corrupt_images_skipped": 0}  # + ties_dropped, bad_label_dropped for Pick-a-Pic rows
    for file, dataset in open_pair_parts(path, split):
        names = column_names(dataset)
        pickapic = names is not None and all(c in names for c in PICKAPIC_COLUMNS) and "chosen_image" not in names
        if pickapic:
            dataset = dataset.select_columns(list(PICKAPIC_COLUMNS))
            counts.setdefault("ties_dropped", 0), counts.setdefault("bad_label_dropped", 0)
        elif names is not None:
            missing = [c for c in REQUIRED_COLUMNS if c not in names]
            if missing:
                raise PairsDataError(f"{file}: missing column(s) {', '.join(missing)} (has {', '.join(names)})")
        has_latents = names is not None and all(c in names for c in LATENT_COLUMNS)
        label = os.path.basename(file) if os.path.exists(file) else file
        for i, row in enumerate(dataset):
            where = f"{file}: row {i}"
            if pickapic:
                row = pickapic_pair(row)
                if isinstance(row, str):
                    counts["ties_dropped" if row == "tie" else "bad_label_dropped"] += 1
                    continue
            if not isinstance(row["prompt"], str) or not row["prompt"].strip():
                raise PairsDataError(f"{where}: empty prompt")
            if row["chosen_score"] is None or row["rejected_score"] is None:
                raise PairsDataError(f"{where}: missing score")
            if not (math.isfinite(row["chosen_score"]) and math.isfinite(row["rejected_score"])):
                raise PairsDataError(f"{where}: non-finite score (chosen {row['chosen_score']}, rejected "
                                     f"{row['rejected_score']})")
            if row["chosen_score"] < row["rejected_score"]:
                raise PairsDataError(f"{where}: chosen_score {row['chosen_score']} < rejected_score "
                                     f"{row['rejected_score']}")
            images = {side: as_bytes(row[side]) for side in ("chosen_image", "rejected_image")}
            bad = None
            for side, data in images.items():
                problem = image_problem(data)
                if problem:
                    bad = f"{where}: {side} is not a decodable image ({problem})"
                    break
            if bad:
                if strict:
                    raise PairsDataError(bad)
                counts["corrupt_images_skipped"] += 1
                continue
            out = {"prompt": row["prompt"], **images,
                   "chosen_score": row["chosen_score"], "rejected_score": row["rejected_score"],
                   "uid": f"{label}:{i}"}
            if has_latents and row["chosen_latents"] is not None:
                try:
                    out.update(chosen_latents=latents_from_bytes(row["chosen_latents"], row["latents_shape"]),
                               rejected_latents=latents_from_bytes(row["rejected_latents"], row["latents_shape"]),
                               height=row["height"], width=row["width"])
                except (ValueError, TypeError) as error:
                    raise PairsDataError(f"{where}: latents do not match latents_shape "
                                         f"{row['latents_shape']} ({error})") from None
            rows.append(out)
            if max_pairs and len(rows) >= max_pairs:
                break
        if max_pairs and len(rows) >= max_pairs:
            break
    counts["rows"] = len(rows)
    if not rows:
        raise PairsDataError(f"{path}: no usable pairs")
    return rows, counts
