"""Prompt data and the per-step data stream: prompt rows from a file, a directory or a Hub dataset
(`load_prompts`), each rank's prompts for a step (`prompts_for_step`, a pure function of the step)
and the seeds of every random stream (`derived_seed`): a resume needs nothing but the step number.
"""

from __future__ import annotations

import hashlib
import os

import torch

from run_config import InputError


PROMPT_COLUMN_NAMES = ("prompt", "caption", "text")  # the first one a source has is the prompt


def _require_utf8_lines(path: str):
    """A text file's bytes must be UTF-8: the error names the first bad line (datasets' text reader
    would only say that some byte somewhere does not decode)."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputError(f"{path}: line {line_number} is not UTF-8 text ({error.reason} at byte "
                                 f"{error.start})") from None


def _prompt_column(name: str, columns: list[str]) -> str:
    """The first of PROMPT_COLUMN_NAMES that `columns` holds; an error naming the source otherwise."""
    found = next((c for c in PROMPT_COLUMN_NAMES if c in columns), None)
    if found is None:
        raise InputError(f"{name}: missing column 'prompt' (has {columns})")
    return found


def load_prompts(path: str, need_ocr_target: bool = False, split: str = "train", max_rows: int = 0) -> list[dict]:
    """Rows {prompt, ground_truth, uid} through `datasets` (records.py): a
    data_process/qwenimage_ocr.py parquet, a .jsonl, a .txt with one prompt per line (blank lines
    skipped), a directory of such files, or a Hub dataset id (its `split`; column prompt, caption or
    text). Errors name the file (or `id[split]`) and row; with need_ocr_target, every prompt must
    carry a quoted OCR target. max_rows > 0 stops reading after that many prompts."""
    from records import is_hub_id
    from rewards import ocr_target

    if not os.path.exists(path) and not is_hub_id(path):
        raise FileNotFoundError(f"prompt data {path!r} does not exist")
    try:
        rows = _read_rows(path, split, max_rows)
    except Exception as error:  # a damaged file (pyarrow's ArrowInvalid, a JSON error) or the Hub: one line
        if isinstance(error, InputError) or not _is_read_error(error):
            raise
        where = getattr(error, "source_name", path)
        raise InputError(f"{where}: cannot be read ({type(error).__name__}: "
                         f"{str(error).strip().splitlines()[0] if str(error).strip() else 'no details'})") from None
    if not rows:
        raise InputError(f"{path}: no prompts")
    if need_ocr_target:
        for row in rows:
            target = ocr_target(row["prompt"])
            if target is None:
                raise InputError(f"{row['uid']}: prompt has no quoted text for the OCR reward: {row['prompt']!r}")
            row["ground_truth"] = row["ground_truth"] if row["ground_truth"] is not None else target
    return rows[:max_rows or None]


def _is_read_error(error: Exception) -> bool:
    """What a damaged or unreadable data file raises through `datasets`: pyarrow's errors (a truncated
    parquet: ArrowInvalid "Parquet magic bytes not found"), JSON decoding, datasets' own, a missing file."""
    import pyarrow

    kinds = (pyarrow.ArrowException, ValueError, OSError)
    try:
        from datasets.exceptions import DatasetGenerationError

        kinds += (DatasetGenerationError,)
    except ImportError:
        pass
    return isinstance(error, kinds)


def _read_rows(path: str, split: str, max_rows: int) -> list[dict]:
    from records import column_names, open_parts

    from records import is_hub_id, local_files

    rows = []
    if not is_hub_id(path):  # a parquet's footer first: datasets would log its own error line before raising
        import pyarrow.parquet

        for file in [f for f in local_files(path) if f.lower().endswith(".parquet")]:
            try:
                pyarrow.parquet.read_metadata(file)
            except Exception as error:
                error.source_name = file
                raise
    try:
        parts = open_parts(path, split, extensions=(".parquet", ".jsonl", ".json", ".txt"))
    except Exception as error:
        error.source_name = path
        raise
    for name, dataset in parts:
        try:
            _read_part(name, dataset, rows, max_rows)
        except Exception as error:
            error.source_name = name
            raise
        if max_rows and len(rows) >= max_rows:
            break
    return rows


def _read_part(name: str, dataset, rows: list[dict], max_rows: int):
    """One part's rows appended to `rows` (uid = file:line for .txt, file:row otherwise)."""
    from records import column_names

    label = os.path.basename(name) if os.path.exists(name) else name
    if name.endswith(".txt"):  # one prompt per line; uid = file:line number
        _require_utf8_lines(name)
        for line_number, row in enumerate(dataset, 1):
            if row["text"].strip():
                rows.append({"prompt": row["text"].strip(), "ground_truth": None, "uid": f"{label}:{line_number}"})
        return
    columns = column_names(dataset)  # None when a streamed source does not say before its first row
    prompt_column = None
    for i, row in enumerate(dataset):
        if prompt_column is None:
            columns = columns or list(row)
            prompt_column = _prompt_column(name, columns)
        prompt = row[prompt_column]
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{name}: row {i}: empty or non-string prompt")
        rows.append({"prompt": prompt, "ground_truth": row.get("ground_truth"), "uid": f"{label}:{i}"})
        if max_rows and len(rows) >= max_rows:
            break
    if columns is not None:  # also a source without rows must have the column
        _prompt_column(name, columns)


def prompts_for_step(rows: list[dict], step: int, prompts_per_step: int, rank: int, world_size: int,
                     seed: int) -> list[dict]:
    """This rank's prompts for a global step: an endless stream of per-epoch permutations (seeded by
    seed and epoch), cut into steps of prompts_per_step and then into equal per-rank slices. A pure
    function of the step: resuming needs nothing but the step number."""
    per_rank = prompts_per_step // world_size
    start = step * prompts_per_step + rank * per_rank
    out = []
    for position in range(start, start + per_rank):
        epoch, offset = divmod(position, len(rows))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(derived_seed("epoch_order", seed, epoch)))
        out.append(rows[int(order[offset])])
    return out


def derived_seed(stream: str, *parts: int) -> int:
    """A 63-bit seed for one named random stream at integer coordinates (seed, step, rank, ...):
    independent streams without stored RNG state. blake2b over the stream name and the parts, so
    neighbouring coordinates, different run seeds and different streams do not collide (beyond the
    ~n^2 / 2^64 chance of any 63-bit hash)."""
    key = ",".join([stream, *(str(int(part)) for part in parts)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def rollout_seeds(seed: int, step: int, rank: int, n: int) -> list[int]:
    """The online trainer's rollout seeds: sample j of this rank's step."""
    return [derived_seed("rollout", seed, step, rank, j) for j in range(n)]


def dpo_noise_seed(seed: int, step: int, rank: int, stream: int, update: int) -> int:
    """The seed of the shared noise and sigma of one DPO update."""
    return derived_seed("dpo_noise", seed, step, rank, stream, update)
