"""Flow-GRPO OCR prompts (dataset/ocr: train.txt, test.txt, one prompt per line) -> parquet.

    python data_process/qwenimage_ocr.py --input_dir /path/to/flow_grpo/dataset/ocr --output_dir data/ocr

Writes OUTPUT_DIR/{train,test}.parquet with columns
    prompt (string, the line stripped), ground_truth (string, rewards.ocr_target(prompt)),
    data_source (string), split (string), index (int64, 0.. in file order).
Blank lines are skipped. Lines without a quoted target, and lines with bytes that are not UTF-8, are
reported with their line numbers and skipped; `--strict` makes either an error. A missing split
file is an error naming it. Files are written to a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewards import ocr_target  # noqa: E402

SPLITS = ("train", "test")


class DataError(ValueError):
    pass


def read_split(path: str, strict: bool = False) -> tuple[list[dict], list[str]]:
    """-> (rows, problems). Each problem names the file and line."""
    if not os.path.isfile(path):
        raise DataError(f"missing split file: {path}")
    rows, problems = [], []
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                problems.append(f"{path}:{line_number}: undecodable bytes at byte {error.start} ({raw[error.start:error.start + 4]!r})")
                continue
            if not line:
                continue
            target = ocr_target(line)
            if target is None:
                problems.append(f"{path}:{line_number}: no quoted text target: {line[:80]!r}")
                continue
            rows.append({"prompt": line, "ground_truth": target})
    if strict and problems:
        raise DataError("\n".join(problems))
    return rows, problems


def write_parquet(rows: list[dict], path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "prompt": pa.array([r["prompt"] for r in rows], pa.string()),
        "ground_truth": pa.array([r["ground_truth"] for r in rows], pa.string()),
        "data_source": pa.array([r["data_source"] for r in rows], pa.string()),
        "split": pa.array([r["split"] for r in rows], pa.string()),
        "index": pa.array([r["index"] for r in rows], pa.int64()),
    })
    tmp = path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def convert(input_dir: str, output_dir: str, strict: bool = False, data_source: str = "flow_grpo_ocr") -> dict:
    results = {}
    for split in SPLITS:  # read everything first: a bad split writes nothing
        rows, problems = read_split(os.path.join(input_dir, f"{split}.txt"), strict)
        for problem in problems:
            print(f"skipped {problem}", file=sys.stderr)
        results[split] = ([{**r, "data_source": data_source, "split": split, "index": i} for i, r in enumerate(rows)],
                          problems)
    os.makedirs(output_dir, exist_ok=True)
    summary = {}
    for split, (rows, problems) in results.items():
        write_parquet(rows, os.path.join(output_dir, f"{split}.parquet"))
        summary[split] = {"rows": len(rows), "skipped": len(problems)}
    return summary


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input_dir", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--strict", action="store_true", help="lines without target / undecodable: error")
    parser.add_argument("--data_source", default="flow_grpo_ocr")
    args = parser.parse_args(argv)
    try:
        summary = convert(args.input_dir, args.output_dir, args.strict, args.data_source)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
