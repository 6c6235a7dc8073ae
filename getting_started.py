"""What a user without their own data needs: where the shipped setups keep their files (absolute
paths, so a preset works from any working directory) and what a script says when its data is missing.
"""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.abspath(__file__))
# make_offline_pairs.py --preset text_world writes here and train_offline_dpo.py --preset text_world
# reads here: one absolute path under the repository (outputs/ is git-ignored).
TEXT_WORLD_PAIRS = os.path.join(ROOT, "outputs", "pairs", "text_world.parquet")

ONLINE_TRY = ("`python train_online_dpo.py --preset text_world` (a tiny model that draws words, scored by PP-OCRv5, "
              "minutes on a CPU) or `python train_online_dpo.py --preset cpu_tiny` (a random tiny model, seconds)")
OFFLINE_TRY = ("`python data_process/make_offline_pairs.py --preset text_world` then "
               "`python train_offline_dpo.py --preset text_world` (the shipped text world), or "
               "`python data_process/make_offline_pairs.py --preset cpu_tiny --output outputs/pairs/tiny.parquet` then "
               "`python train_offline_dpo.py --preset cpu_tiny --pairs_path outputs/pairs/tiny.parquet`")


def missing_data_rule(path: str, script: str, data_flags: str, try_instead: str) -> str:
    """The rule for a data file that does not exist, with what to run instead: the shipped presets
    (no download) or the script's --help. `data_flags`: the flags that take the user's own data."""
    return (f"file {path!r} does not exist. Pass your own data ({data_flags}), or try a shipped setup that needs "
            f"no download: {try_instead}; `python {script} --help` lists every flag")
