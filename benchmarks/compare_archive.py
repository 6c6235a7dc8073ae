"""The comparison's archive: one JSON line per finished run (benchmarks/compare_objectives.py), keyed by
what the run was (variant, seed, knob, steps, extra flags, and the trainer's defaults it ran under), so
that a comparison spread over sessions and machines accumulates its runs in one file.
"""

from __future__ import annotations

import json
import os

# The trainer's defaults a run ran under, part of its archive key (a run under other defaults is another
# run, never taken for this one): 1 = before the official group updates (commit 5d1b2a8, the rows of
# docs/results/compare_objectives.jsonl), 2 = since (docs/results/compare_objectives_v2.jsonl).
DEFAULTS = 2


def archive_key(r: dict) -> tuple:
    return r["variant"], r["seed"], tuple(r["knob"]), r["steps"], tuple(r["extra"]), r.get("defaults", 1)


def load_archive(path: str) -> list[dict]:
    if not path or not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise SystemExit(f"{path} line {number}: not a JSON run result ({e})")
    return rows


def update_archive(path: str, runs: list[dict], key=archive_key) -> dict[tuple, dict]:
    """Archive + these runs (a re-run replaces its archived row), written atomically, rows in key order;
    returns all by key. `key(row)`: a row's identity (compare_offline.py has its own)."""
    merged = {key(r): r for r in load_archive(path)}
    merged.update({key(r): r for r in runs})
    if runs:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path + ".tmp", "w") as f:
            for k in sorted(merged):
                f.write(json.dumps(merged[k]) + "\n")
        os.replace(path + ".tmp", path)
    return merged
