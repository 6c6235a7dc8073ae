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
    pq.write_table(pa.table(columns), tmp)
    os.replace(tmp, path)


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


def pair_files(path: str) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
        if not files:
            raise PairsDataError(f"no .parquet files in {path}")
        return files
    if not os.path.isfile(path):
        raise PairsDataError(f"pairs file {path} does not exist")
    return [path]


def read_pairs(path: str, strict: bool = False) -> tuple[list[dict], dict]:
    """-> (rows, counts). Each row: prompt, chosen/rejected image bytes, scores, and the latents as
    numpy arrays when present. A missing column or chosen_score < rejected_score is an error naming
    the file (and row); undecodable images skip the row (counted), or raise with strict."""
    import pyarrow.parquet as pq

    rows, counts = [], {"rows": 0, "corrupt_images_skipped": 0}
    for file in pair_files(path):
        table = pq.read_table(file)
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise PairsDataError(f"{file}: missing column(s) {', '.join(missing)} (has {', '.join(table.column_names)})")
        has_latents = all(c in table.column_names for c in LATENT_COLUMNS)
        for i, row in enumerate(table.to_pylist()):
            where = f"{file}: row {i}"
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
            bad = None
            for side in ("chosen_image", "rejected_image"):
                problem = image_problem(row[side])
                if problem:
                    bad = f"{where}: {side} is not a decodable image ({problem})"
                    break
            if bad:
                if strict:
                    raise PairsDataError(bad)
                counts["corrupt_images_skipped"] += 1
                continue
            out = {"prompt": row["prompt"], "chosen_image": row["chosen_image"], "rejected_image": row["rejected_image"],
                   "chosen_score": row["chosen_score"], "rejected_score": row["rejected_score"],
                   "uid": f"{os.path.basename(file)}:{i}"}
            if has_latents and row["chosen_latents"] is not None:
                try:
                    out.update(chosen_latents=latents_from_bytes(row["chosen_latents"], row["latents_shape"]),
                               rejected_latents=latents_from_bytes(row["rejected_latents"], row["latents_shape"]),
                               height=row["height"], width=row["width"])
                except (ValueError, TypeError) as error:
                    raise PairsDataError(f"{where}: latents do not match latents_shape "
                                         f"{row['latents_shape']} ({error})") from None
            rows.append(out)
    counts["rows"] = len(rows)
    if not rows:
        raise PairsDataError(f"{path}: no usable pairs")
    return rows, counts
