"""Rows of a data source through Hugging Face `datasets`, for prompts and preference pairs alike.

A source is a local file (.parquet, .jsonl / .json, .txt: one row per line in column `text`), a
directory of such files, or a Hub dataset id (`yuvalkirstain/pickapic_v2`, with a split). Every
source is read with `load_dataset(..., streaming=True)`: rows arrive one at a time, nothing is
copied into the datasets cache, and Hub sets too big to download (Pick-a-Pic v2: ~1M rows of JPEG
pairs) can be read for their first N rows. Offline (HF_DATASETS_OFFLINE=1) local files still work.
Each part is named (file name, or `id[split]`) so that errors say where a bad row is.
"""

from __future__ import annotations

import os
import re

BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.\[\]:%-]+)?$")


def is_hub_id(spec: str) -> bool:
    """`owner/name` (optionally `owner/name:split`) that is not an existing local path and does not
    end like a data file."""
    return (bool(_HUB_ID.match(spec)) and not os.path.exists(spec)
            and os.path.splitext(spec.split(":")[0])[1].lower() not in BUILDERS)


def source_exists(spec: str) -> bool:
    """For config validation: a local path that exists, or something shaped like a Hub dataset id."""
    return os.path.exists(spec) or is_hub_id(spec)


def hub_offline() -> bool:
    """HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set (to 1 / true / yes / on): no Hub requests."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def source_problem(spec: str, extensions=tuple(BUILDERS)) -> str | None:
    """For config validation, before anything loads: None when `spec` can be read, else why not. A
    local folder must hold data files; something that is not a local path is tried as a Hub dataset
    id: offline that fails at once (no retries), online one bounded request asks the Hub whether it
    exists, so a typo'd local path (`mydata/prompts`) reads "does not exist"."""
    if os.path.isdir(spec):
        if not any(os.path.splitext(name)[1].lower() in extensions for name in os.listdir(spec)):
            return f"folder {spec!r} holds no {' / '.join(extensions)} files"
        return None
    if os.path.exists(spec):
        return None
    if not is_hub_id(spec):
        return f"{spec!r} does not exist"
    repo = spec.split(":")[0]
    if hub_offline():
        return (f"{spec!r} does not exist as a local path, and Hub dataset ids cannot be read offline "
                "(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set)")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        HfApi().dataset_info(repo, timeout=10)
    except GatedRepoError:  # it exists; reading it needs an accepted licence and a token
        return None
    except RepositoryNotFoundError:
        return (f"{spec!r} does not exist: no such local path, and no Hub dataset {repo!r} (or it is private "
                "and no token is set)")
    except Exception as error:  # no network, DNS, proxy: one line, no retries
        return (f"{spec!r} does not exist as a local path, and the Hub could not be reached to read it as a "
                f"dataset id ({type(error).__name__})")
    return None


def local_files(path: str, extensions=tuple(BUILDERS)) -> list[str]:
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if os.path.splitext(f)[1].lower() in extensions)
        if not files:
            raise FileNotFoundError(f"no {' / '.join(extensions)} files in {path!r}")
        return files
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path!r} does not exist")
    return [path]


def open_parts(spec: str, split: str = "train", extensions=tuple(BUILDERS), columns: list[str] | None = None):
    """-> [(name, IterableDataset)]: one part per local file (name = the file path), or the Hub
    dataset's split (name = `id[split]`). `columns` keeps only those (when the part has them)."""
    from datasets import load_dataset

    if is_hub_id(spec):
        spec, _, named_split = spec.partition(":")  # `owner/name:split` names its own split
        split = named_split or split
        # images stay encoded bytes (decode(False)): the pairs format keeps them as they are
        parts = [(f"{spec}[{split}]", load_dataset(spec, split=split, streaming=True).decode(False))]
    else:
        parts = []
        for file in local_files(spec, extensions):
            builder = BUILDERS[os.path.splitext(file)[1].lower()]
            parts.append((file, load_dataset(builder, data_files=file, split="train", streaming=True)))
    if columns:
        parts = [(name, ds.select_columns(columns) if ds.column_names and set(columns) <= set(ds.column_names) else ds)
                 for name, ds in parts]
    return parts


def column_names(dataset) -> list[str] | None:
    """The part's columns when its features are known before reading (parquet, Hub); else None."""
    return list(dataset.column_names) if dataset.column_names is not None else None


def as_bytes(value):
    """Image cells as encoded bytes: raw binary, a datasets Image dict {bytes, path}, or a PIL image."""
    if value is None or isinstance(value, (bytes, bytearray)):
        return value
    if isinstance(value, dict) and "bytes" in value:
        return value["bytes"]
    if hasattr(value, "save"):  # a decoded PIL image
        import io

        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    return value
