"""A user without data or with existing output: what the scripts say and refuse, from any directory."""

import os
import subprocess
import sys

import pytest

import train_offline_dpo
import train_online_dpo
import run_config
from conftest import ROOT


def run_script(script, args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ""}
    return subprocess.run([sys.executable, os.path.join(ROOT, script), *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def test_a_trainer_without_data_says_what_to_run_instead(tmp_path):
    """No arguments: one line on stderr, exit 2, naming the missing file and the shipped presets."""
    result = run_script("train_online_dpo.py", [], cwd=tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for says in ("'data/ocr/train.parquet' does not exist", "--preset text_world", "--preset cpu_tiny", "--help",
                 "--train_data"):
        assert says in result.stderr, (says, result.stderr)
    with pytest.raises(run_config.ConfigError) as error:
        train_offline_dpo.main([])
    for says in ("config field `pairs_path`", "make_offline_pairs.py --preset text_world", "--preset cpu_tiny",
                 "train_offline_dpo.py --help"):
        assert says in str(error.value), (says, str(error.value))


def test_the_offline_text_world_preset_reads_where_make_offline_pairs_writes_from_any_directory(tmp_path, monkeypatch):
    from data_process import make_offline_pairs

    pairs_path = train_offline_dpo.PRESETS["text_world"]["pairs_path"]
    assert os.path.isabs(pairs_path) and pairs_path == make_offline_pairs.PRESETS["text_world"]["output"]
    assert pairs_path == os.path.join(ROOT, "outputs", "pairs", "text_world.parquet")
    monkeypatch.chdir(tmp_path)  # another working directory
    config = run_config.parse_config(train_offline_dpo.Config, train_offline_dpo.PRESETS,
                             ["--preset", "text_world", "--output_dir", str(tmp_path / "run")])
    if os.path.exists(pairs_path):  # made by an earlier make_offline_pairs run: the preset validates as is
        train_offline_dpo.validate(config)
    else:  # the preset points at the repository's file, and the message says how to make it
        with pytest.raises(run_config.ConfigError, match="make_offline_pairs.py --preset text_world"):
            train_offline_dpo.validate(config)
    pairs_config = run_config.parse_config(make_offline_pairs.PairsConfig, make_offline_pairs.PRESETS, ["--preset", "text_world"])
    assert pairs_config.output == pairs_path and os.path.isabs(pairs_config.prompts)


def test_make_offline_pairs_refuses_to_overwrite_its_output_unless_told(tmp_path):
    from data_process import make_offline_pairs

    output = tmp_path / "pairs.parquet"
    output.write_bytes(b"minutes of work")
    result = run_script("data_process/make_offline_pairs.py", ["--preset", "cpu_tiny", "--output", str(output)], tmp_path)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert str(output) in result.stderr and "--overwrite_output true" in result.stderr
    assert output.read_bytes() == b"minutes of work"
    config = run_config.parse_config(make_offline_pairs.PairsConfig, make_offline_pairs.PRESETS,
                             ["--preset", "cpu_tiny", "--output", str(output), "--overwrite_output", "true"])
    make_offline_pairs.validate(config)  # allowed: the file would be replaced
    config = run_config.parse_config(make_offline_pairs.PairsConfig, make_offline_pairs.PRESETS,
                             ["--preset", "cpu_tiny", "--output", str(tmp_path / "new.parquet")])
    make_offline_pairs.validate(config)  # a new file needs no flag
