"""Pick-a-Pic v2 rows (caption, jpg_0, jpg_1, label_0) -> the pairs parquet (pairs_format.py).

    python data_process/pickapic_to_pairs.py --input /path/to/pickapic_v2/data --output data/pairs/pickapic.parquet
    python data_process/pickapic_to_pairs.py --input yuvalkirstain/pickapic_v2 --split validation_unique \\
        --max_rows 500 --output data/pairs/pickapic_val.parquet      # streamed from the Hub

label_0 = 1: jpg_0 preferred; 0: jpg_1 preferred; 0.5: a tie, dropped and counted. The preferred
image becomes chosen (score 1.0), the other rejected (score 0.0); image bytes are kept as they are.
Rows whose images do not decode completely (e.g. truncated JPEGs) are dropped and counted; with
--strict they are an error naming the file and row.
Seeds are unknown (-1). Input: one parquet file, a directory of them, or a Hub dataset id (streamed
through `datasets`). The offline trainer also reads Pick-a-Pic rows directly (--pairs_path).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pairs_format import (PICKAPIC_COLUMNS, PairsDataError, image_problem,  # noqa: E402
                                       open_pair_parts, pickapic_pair, write_pairs)


def convert(input_path: str, output: str, strict: bool = False, split: str = "train", max_rows: int = 0) -> dict:
    """Local parquet file(s) or a Hub dataset id (streamed through `datasets`; max_rows > 0 reads
    only the first max_rows rows) -> the pairs parquet."""
    from records import as_bytes, column_names

    rows = []
    counts = {"rows_in": 0, "pairs": 0, "ties_dropped": 0, "bad_label_dropped": 0, "corrupt_images_dropped": 0}
    for file, dataset in open_pair_parts(input_path, split, columns=list(PICKAPIC_COLUMNS)):
        names = column_names(dataset)
        missing = [c for c in PICKAPIC_COLUMNS if names is not None and c not in names]
        if missing:
            raise PairsDataError(f"{file}: missing column(s) {', '.join(missing)}")
        for i, row in enumerate(dataset):
            if max_rows and counts["rows_in"] >= max_rows:
                break
            counts["rows_in"] += 1
            pair = pickapic_pair(row)
            if isinstance(pair, str):
                counts["ties_dropped" if pair == "tie" else "bad_label_dropped"] += 1
                continue
            problems = [f"{side}: {p}" for side in ("jpg_0", "jpg_1") if (p := image_problem(as_bytes(row[side])))]
            if problems:
                if strict:
                    raise PairsDataError(f"{file}: row {i}: image does not decode ({problems[0]})")
                counts["corrupt_images_dropped"] += 1
                continue
            rows.append(pair)
    counts["pairs"] = len(rows)
    write_pairs(rows, output)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="parquet file, directory of them, or a Hub dataset id")
    parser.add_argument("--output", required=True)
    parser.add_argument("--strict", action="store_true", help="an undecodable image is an error, not a dropped row")
    parser.add_argument("--split", default="train", help="split of a Hub dataset id")
    parser.add_argument("--max_rows", type=int, default=0, help="read only the first N rows (0 = all)")
    args = parser.parse_args(argv)
    try:
        counts = convert(args.input, args.output, strict=args.strict, split=args.split, max_rows=args.max_rows)
    except (PairsDataError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
