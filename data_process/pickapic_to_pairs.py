"""Pick-a-Pic v2 rows (caption, jpg_0, jpg_1, label_0) -> the pairs parquet (pairs_format.py).

    python data_process/pickapic_to_pairs.py --input /path/to/pickapic_v2/data --output data/pairs/pickapic.parquet

label_0 = 1: jpg_0 preferred; 0: jpg_1 preferred; 0.5: a tie, dropped and counted. The preferred
image becomes chosen (score 1.0), the other rejected (score 0.0); image bytes are kept as they are.
Rows whose images do not decode completely (e.g. truncated JPEGs) are dropped and counted; with
--strict they are an error naming the file and row.
Seeds are unknown (-1). Input: one parquet file or a directory of them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from data_process.pairs_format import PairsDataError, image_problem, pair_files, write_pairs  # noqa: E402

PICKAPIC_COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0")


def convert(input_path: str, output: str, strict: bool = False) -> dict:
    import pyarrow.parquet as pq

    rows, counts = [], {"rows_in": 0, "pairs": 0, "ties_dropped": 0, "bad_label_dropped": 0, "corrupt_images_dropped": 0}
    for file in pair_files(input_path):
        table = pq.read_table(file, columns=None)
        missing = [c for c in PICKAPIC_COLUMNS if c not in table.column_names]
        if missing:
            raise PairsDataError(f"{file}: missing column(s) {', '.join(missing)}")
        for i, row in enumerate(table.select(list(PICKAPIC_COLUMNS)).to_pylist()):
            counts["rows_in"] += 1
            label = row["label_0"]
            if label == 0.5:
                counts["ties_dropped"] += 1
                continue
            if label not in (0, 1, 0.0, 1.0):
                counts["bad_label_dropped"] += 1
                continue
            problems = [f"{side}: {p}" for side in ("jpg_0", "jpg_1") if (p := image_problem(row[side]))]
            if problems:
                if strict:
                    raise PairsDataError(f"{file}: row {i}: image does not decode ({problems[0]})")
                counts["corrupt_images_dropped"] += 1
                continue
            chosen, rejected = ("jpg_0", "jpg_1") if label == 1 else ("jpg_1", "jpg_0")
            rows.append({"prompt": row["caption"], "chosen_image": row[chosen], "rejected_image": row[rejected],
                         "chosen_score": 1.0, "rejected_score": 0.0})
    counts["pairs"] = len(rows)
    write_pairs(rows, output)
    return counts


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--strict", action="store_true", help="an undecodable image is an error, not a dropped row")
    args = parser.parse_args(argv)
    try:
        counts = convert(args.input, args.output, strict=args.strict)
    except PairsDataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
