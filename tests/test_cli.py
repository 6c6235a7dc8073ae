"""The command line: --help from the Config source comments, one-line config errors with exit
status 2, closest-field suggestions for misspelled flags."""

import os
import subprocess
import sys

import pytest

import train_offline_dpo
import run_config
import train_online_dpo
from conftest import ROOT


def help_text(module, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # no wrapping
    with pytest.raises(SystemExit) as exit_info:
        run_config.parse_config(module.Config, module.PRESETS, ["--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("module", [train_online_dpo, train_offline_dpo])
def test_help_lists_every_field_with_its_source_comment_default_and_the_presets(module, capsys, monkeypatch):
    import dataclasses

    text = help_text(module, capsys, monkeypatch)
    comments = run_config.field_comments(module.Config)
    for field in dataclasses.fields(module.Config):
        assert f"--{field.name}" in text
    assert len(comments) >= 5
    for name, comment in comments.items():
        default = getattr(module.Config, name)
        assert f"{comment} (default: {default})" in text, name
    assert "(default: 0.9)" in text  # adam_beta1, a field without a comment: generic help, default shown
    assert "presets (--preset NAME" in text and "cpu_tiny: --pretrained tiny" in text
    assert module.__doc__.split("\n")[0] in text  # the script's docstring heads the help


def test_field_comments_reads_trailing_comments_only():
    comments = run_config.field_comments(train_online_dpo.Config)
    assert comments["samples_per_prompt"] == "K rollouts per prompt (all on one rank)"
    assert "adam_beta1" not in comments and "model" not in comments  # no comment; a section title


CONFIG_ERRORS = [
    (["--preset", "cpu_tiny", "--beta", "0"], "config field `beta`: must be a finite number > 0"),
    (["--preset", "cpu_tiny", "--beat", "3"], "unknown flag `--beat`; did you mean `--beta`?"),
    (["--preset", "cpu_tiny", "--beta", "abc"], "config field `beta`: invalid float value: 'abc'"),
    (["--preset", "cpu_tiny", "--reward", "ocr:1,pickscor:0.2"], "config field `reward`: unknown reward 'pickscor'"),
    (["--preset", "cpu_tinny"], "config field `preset`: unknown preset 'cpu_tinny'; known: cpu_tiny, text_world"),
]


def test_a_config_error_prints_one_line_and_exits_2_in_a_real_process():
    args, message = CONFIG_ERRORS[0]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "train_online_dpo.py"), *args], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"train_online_dpo.py: {message}\n", result.stderr


@pytest.mark.parametrize("args,message", CONFIG_ERRORS[1:])
def test_config_errors_print_one_line_and_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_config.cli(train_online_dpo.main, args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err


def test_in_process_errors_are_value_errors_naming_the_field():
    with pytest.raises(run_config.ConfigError, match="did you mean `--learning_rate`"):
        run_config.parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, ["--learning-rat", "1"])
    with pytest.raises(ValueError, match="config field `reward_kwargs`: with several rewards"):
        train_online_dpo.main(["--preset", "cpu_tiny", "--reward", "brightness,clipscore:0.1",
                               "--reward_kwargs", '{"model": "x"}'])
    config = run_config.parse_config(train_online_dpo.Config, train_online_dpo.PRESETS,
                                     ["--preset", "cpu_tiny", "--reward", "brightness:1.0,clipscore:0.2",
                                      "--reward_kwargs", '{"clipscore": {"model": "x"}}'])
    train_online_dpo.validate(config)  # the weighted spec and per-component kwargs are accepted


def test_bad_input_and_a_refused_run_folder_print_one_line_and_exit_2(tmp_path, capsys):
    """Errors that name a file, line or row (not only config fields) get the same one-line treatment."""
    from data_process.pairs_format import PairsDataError

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red apple\nbad \xff byte\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    pairs = tmp_path / "pairs.parquet"
    pairs.write_bytes(b"not parquet")
    cases = [
        (train_online_dpo.main, ["--preset", "cpu_tiny", "--train_data", str(prompts), "--output_dir", str(tmp_path / "a")],
         (), f"{prompts}: line 2 is not UTF-8 text"),
        (train_online_dpo.main, ["--preset", "cpu_tiny", "--output_dir", str(run)], (),
         f"output_dir {str(run)!r} already holds a run (metrics.jsonl)"),
        (train_offline_dpo.main, ["--preset", "cpu_tiny", "--pairs_path", str(pairs), "--output_dir", str(tmp_path / "b")],
         (PairsDataError,), str(pairs)),
    ]
    for main, args, extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_config.cli(main, args, input_errors=extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
