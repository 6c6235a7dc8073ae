"""The command line: --help from the Config source comments, one-line config errors with exit
status 2, closest-field suggestions for misspelled flags."""

import json
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
def test_help_lists_every_field_once_with_its_source_comment_default_and_the_presets(module, capsys, monkeypatch):
    import dataclasses

    text = help_text(module, capsys, monkeypatch)
    comments = run_config.field_comments(module.Config)
    option_lines = [line.split()[0] for line in text.splitlines() if line.startswith("  --")]
    assert sorted(option_lines) == sorted({f"--{f.name}" for f in dataclasses.fields(module.Config)} |
                                          {"--no_gradient_checkpointing"})  # each once, no --dashed-alias
    assert "--learning-rate" not in text and "see the knobs tables" not in text
    assert len(text.splitlines()) < 2 * len(option_lines) + 40  # a line per flag, the docstring, the presets
    for name, comment in comments.items():
        if name != "preset":
            assert f"{comment} (default: {run_config.shown_value(getattr(module.Config, name))})" in text, name
    assert "presets (--preset NAME" in text and "cpu_tiny: --pretrained tiny" in text
    assert run_config.ROOT not in text  # project paths are shown relative to the project
    assert module.__doc__.split("\n")[0] in text  # the script's docstring heads the help


# Config fields of train_online_dpo.py whose lines other branches rewrite (objective-specific fields):
# their help comments come with those branches; then this set empties.
HELP_PENDING = set()


def script_configs():
    import evaluate
    from data_process import make_offline_pairs

    return [(train_online_dpo.Config, HELP_PENDING), (train_offline_dpo.Config, set()),
            (evaluate.EvalConfig, set()), (make_offline_pairs.PairsConfig, set())]


def test_every_field_of_every_script_has_a_help_comment_naming_its_choices():
    import dataclasses

    import group_losses
    import pairing
    import qwen_image
    import rewards
    from objectives import OBJECTIVES

    choices = {"reward": rewards.REWARDS, "objective": OBJECTIVES, "pair_strategy": pairing.PAIR_STRATEGIES,
               "sigma_scheme": pairing.SIGMA_SCHEMES, "lora_init": qwen_image.LORA_INITS,
               "awm_weighting": group_losses.AWM_WEIGHTINGS, "dtype": ("bfloat16", "float16", "float32"),
               "train_mode": ("lora", "full"), "sharding": ("none", "fsdp2"),
               "log_with": ("wandb", "tensorboard", "none"), "compile_backend": ("inductor", "aot_eager", "eager")}
    for config_cls, pending in script_configs():
        comments = run_config.field_comments(config_cls)
        missing = [f.name for f in dataclasses.fields(config_cls) if f.name not in comments and f.name not in pending]
        assert not missing, f"{config_cls.__module__}.{config_cls.__name__}: fields without a help comment: {missing}"
        for name, names in choices.items():
            if name in comments:
                unlisted = [choice for choice in names if choice not in comments[name]]
                assert not unlisted, f"{config_cls.__module__}: --{name}'s help does not list {unlisted}"


def test_field_comments_reads_trailing_comments_only():
    from dataclasses import dataclass

    @dataclass
    class Example:
        # a section title, not a help text
        plain: int = 1
        helped: str = "x"  # the help text
        wrapped: tuple = (1,
                          2)  # a comment on the field's continuation line counts too

    comments = run_config.field_comments(Example)
    assert comments == {"helped": "the help text", "wrapped": "a comment on the field's continuation line counts too"}
    assert run_config.field_comments(train_online_dpo.Config)["samples_per_prompt"] == "K rollouts per prompt (all on one rank)"


def test_a_dashed_flag_is_refused_with_the_field_suggested():
    with pytest.raises(run_config.ConfigError, match="unknown flag `--learning-rate`; did you mean `--learning_rate`"):
        run_config.parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, ["--learning-rate", "1e-3"])
    config = run_config.parse_config(train_online_dpo.Config, train_online_dpo.PRESETS,
                                     ["--learning_rate", "1e-3", "--no_gradient_checkpointing"])
    assert config.learning_rate == 1e-3 and config.gradient_checkpointing is False


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
    from pairs_format import PairsDataError

    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red apple\nbad \xff byte\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("{}\n")
    (run / "config.json").write_text(json.dumps({"output_dir": str(run), "max_steps": 2, "train_mode": "lora",
                                                 "resume_from_checkpoint": "", "overwrite_output_dir": False}))
    pairs = tmp_path / "pairs.parquet"
    pairs.write_bytes(b"not parquet")
    cases = [
        (train_online_dpo.main, ["--preset", "cpu_tiny", "--train_data", str(prompts), "--output_dir", str(tmp_path / "a")],
         (), f"{prompts}: line 2 is not UTF-8 text"),
        (train_online_dpo.main, ["--preset", "cpu_tiny", "--output_dir", str(run)], (),
         f"output_dir {str(run)!r} already holds a run (config.json, metrics.jsonl)"),
        (train_offline_dpo.main, ["--preset", "cpu_tiny", "--pairs_path", str(pairs), "--output_dir", str(tmp_path / "b")],
         (PairsDataError,), str(pairs)),
    ]
    for main, args, extra, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_config.cli(main, args, input_errors=extra)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err, err
