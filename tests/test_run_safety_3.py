"""Issue 33, "nothing lost, round three": a run never writes into or deletes from a model or data
folder or a folder that holds no run; the exported LoRA is the adapter its card describes (the EMA
with eval_with_ema); a resume says how many steps it runs; a typo of a local model path is one line;
an error before the run writes leaves no folder; a full disk at the final weights and the export of
a full fine-tune are one line each."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import run_config
import run_folder
import train_offline_dpo
import train_online_dpo
from conftest import ROOT

SMALL = ["--preset", "cpu_tiny", "--prompts_per_step", "2", "--samples_per_prompt", "2", "--eval_every", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def tree_hashes(folder) -> dict:
    """{relative path: sha256} of every file under folder."""
    hashes = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                hashes[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return hashes


def cli_error(main, argv, capsys, monkeypatch, script="train_online_dpo.py") -> str:
    """A script's command line in-process (run_config.cli): exit status 2 and one line on stderr."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        run_config.cli(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert raised.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def prepare(argv):
    """The real accelerator and run-folder preparation of a launch (no model loads)."""
    from distributed import make_accelerator

    config = run_config.parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, argv)
    accelerator = make_accelerator(config)
    try:
        run_folder.prepare_output_dir(config, accelerator, train_online_dpo.objective_knobs(config))
    finally:
        run_folder.release_run_dir()
    return config


def test_a_model_or_data_folder_as_output_dir_is_refused_and_every_file_stays(tmp_path, capsys, monkeypatch):
    world = tmp_path / "world"
    shutil.copytree(os.path.join(ROOT, "worlds", "text_world"), world)
    before = tree_hashes(world)
    base = SMALL + ["--max_steps", "1", "--pretrained", str(world)]
    for extra in ([], ["--overwrite_output_dir", "true"]):
        for out in (world, world / "transformer"):
            line = cli_error(train_online_dpo.main, base + ["--output_dir", str(out), *extra], capsys, monkeypatch)
            assert f"config field `output_dir`: '{out}' is the pretrained folder '{world}' or inside it" in line
    pairs = tmp_path / "pairs.parquet"
    pairs.write_bytes(b"read only after the run folder checks")
    line = cli_error(train_offline_dpo.main, ["--preset", "cpu_tiny", "--pairs_path", str(pairs), "--pretrained", str(world),
                                              "--output_dir", str(world), "--overwrite_output_dir", "true"],
                     capsys, monkeypatch, "train_offline_dpo.py")
    assert "config field `output_dir`:" in line and "is the pretrained folder" in line
    assert tree_hashes(world) == before  # every file, the same bytes; no .lock either
    # a model folder that is not --pretrained: refused whatever overwrite_output_dir says
    other = tmp_path / "other_model"
    shutil.copytree(world, other)
    line = cli_error(train_online_dpo.main, SMALL + ["--output_dir", str(other), "--overwrite_output_dir", "true"],
                     capsys, monkeypatch)
    assert f"config field `output_dir`: '{other}' holds a model (model_index.json)" in line
    assert tree_hashes(other) == before
    # the train data folder
    data = tmp_path / "data"
    data.mkdir()
    (data / "prompts.txt").write_text("a red square\na blue circle\n")
    line = cli_error(train_online_dpo.main, SMALL + ["--train_data", str(data), "--output_dir", str(data / "run")],
                     capsys, monkeypatch)
    assert f"config field `output_dir`: '{data / 'run'}' is the train_data folder '{data}' or inside it" in line
    assert sorted(os.listdir(data)) == ["prompts.txt"]


def test_a_folder_without_a_run_is_never_deleted_from_and_a_runs_overwrite_deletes_only_its_own(tmp_path, capsys,
                                                                                                monkeypatch):
    mine = tmp_path / "mine"
    for name, text in (("samples/cat.png", "png"), ("lora/pytorch_lora_weights.safetensors", "weights"),
                       ("notes.txt", "notes")):
        (mine / name).parent.mkdir(parents=True, exist_ok=True)
        (mine / name).write_text(text)
    before = tree_hashes(mine)
    for extra in ([], ["--overwrite_output_dir", "true"], ["--resume_from_checkpoint", "latest"]):
        line = cli_error(train_online_dpo.main, SMALL + ["--max_steps", "1", "--output_dir", str(mine), *extra],
                         capsys, monkeypatch)
        assert f"output_dir '{mine}' holds lora, samples but no run of this project" in line
        assert "nothing in it is written over or deleted" in line
        assert tree_hashes(mine) == before and sorted(os.listdir(mine)) == ["lora", "notes.txt", "samples"]  # no .lock
    # a run's own folder (its config.json next to metrics.jsonl): the overwrite deletes the run's entries only
    run = tmp_path / "run"
    run.mkdir()
    config = run_config.parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, SMALL + ["--output_dir", str(run)])
    (run / "config.json").write_text(json.dumps(run_config.config_dict(config)))
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    for name in ("lora", "samples", "transformer", "checkpoint-1"):
        (run / name).mkdir()
    (run / "transformer" / "mine.txt").write_text("a LoRA run writes no transformer/: not the run's")
    capsys.readouterr()
    prepare(SMALL + ["--output_dir", str(run), "--overwrite_output_dir", "true"])
    assert "deleting config.json, metrics.jsonl, lora, samples, checkpoint-1 in" in capsys.readouterr().out
    assert sorted(os.listdir(run)) == ["transformer"]  # the lock file went with the (test's) end of the run
    assert run_folder.is_run_dir(str(run)) is False


def write_checkpoint(out, step, config):
    """A complete checkpoint in the trainer's format (test_run_safety's), and the run marker
    (config.json, metrics.jsonl)."""
    from test_run_safety import write_checkpoint as write_checkpoint_only

    write_checkpoint_only(out, step, config)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(run_config.config_dict(config), f)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": step}) + "\n")


def test_a_resume_says_how_many_steps_it_runs_and_where_max_steps_comes_from(tmp_path, capsys):
    out = str(tmp_path / "run")
    first = run_config.parse_config(train_online_dpo.Config, train_online_dpo.PRESETS,
                                    SMALL + ["--output_dir", out, "--max_steps", "12"])
    write_checkpoint(out, 10, first)
    capsys.readouterr()
    prepare(SMALL + ["--output_dir", out, "--resume_from_checkpoint", "latest"])
    assert ("resuming at step 10 of 20: 10 steps to run (max_steps 20 from the preset cpu_tiny; the run that wrote "
            "the checkpoint had max_steps 12)") in capsys.readouterr().out
    prepare(SMALL + ["--output_dir", out, "--resume_from_checkpoint", "latest", "--max_steps", "12"])
    assert "resuming at step 10 of 12: 2 steps to run (max_steps 12 from --max_steps;" in capsys.readouterr().out
    prepare(SMALL + ["--output_dir", out, "--resume_from_checkpoint", "latest", "--max_steps=10"])
    assert "resuming at step 10 of 10: nothing left to train (max_steps 10 from --max_steps;" in capsys.readouterr().out
    prepare(["--output_dir", out, "--resume_from_checkpoint", "latest", "--prompts_per_step", "2", "--samples_per_prompt",
             "2", "--eval_every", "0", "--reward", "brightness", "--eval_data", run_config.TINY_PROMPTS,
             "--train_data", run_config.TINY_PROMPTS, "--pretrained", "tiny", "--dtype", "float32", "--height", "64",
             "--width", "64", "--lora_rank", "8", "--lora_alpha", "8", "--lora_targets", first.lora_targets,
             "--learning_rate", "3e-2", "--max_sequence_length", "64", "--eval_inference_steps", "4",
             "--eval_samples_per_prompt", "4", "--num_inference_steps", "4"])
    assert "resuming at step 10 of 300: 290 steps to run (max_steps 300 the default;" in capsys.readouterr().out


def test_a_typo_of_a_local_model_path_is_one_line_with_the_closest_name(tmp_path, capsys, monkeypatch):
    import evaluate
    import generate
    import qwen_image
    from data_process import make_offline_pairs

    monkeypatch.chdir(ROOT)
    expected = "config field `pretrained`: 'worlds/text_wrold' does not exist (a local path, not a Hub id); " \
               "did you mean 'worlds/text_world'?"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # online: a Hub-shaped typo must not reach the Hub
    out = tmp_path / "run"
    line = cli_error(train_online_dpo.main, SMALL + ["--pretrained", "worlds/text_wrold", "--output_dir", str(out)],
                     capsys, monkeypatch)
    assert line.endswith(expected), line
    assert not out.exists()  # refused before the run folder (and its lock) exists
    pairs = os.path.join(ROOT, "data", "tiny_prompts.txt")  # exists; read only after the checks
    line = cli_error(train_offline_dpo.main, ["--preset", "cpu_tiny", "--pairs_path", pairs, "--pretrained", "worlds/text_wrold"],
                     capsys, monkeypatch, "train_offline_dpo.py")
    assert line.endswith(expected), line
    for main, argv in ((evaluate.main, ["--preset", "cpu_tiny"]), (generate.main, ["--prompt", "a red square"]),
                       (make_offline_pairs.main, ["--preset", "cpu_tiny", "--output", "/tmp/unused-pairs.parquet"])):
        with pytest.raises(run_config.ConfigError) as raised:
            main(argv + ["--pretrained", "worlds/text_wrold"])
        assert str(raised.value) == expected
    with pytest.raises(run_config.ConfigError, match=r"'\./worlds/nothing_like_it' does not exist \(a local path"):
        run_config.require_pretrained("./worlds/nothing_like_it")
    with pytest.raises(FileNotFoundError, match="no such local model folder"):  # the library call: no Hub download
        qwen_image.load_pipeline("worlds/text_wrold")


@pytest.mark.slow
def test_an_error_before_the_run_writes_leaves_no_folder_and_no_lock(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red apple\nbad \xff byte\n")  # read after the run folder is locked
    out = tmp_path / "new" / "run"
    existing = tmp_path / "existing"
    existing.mkdir()
    for folder in (out, existing):
        result = subprocess.run([sys.executable, os.path.join(ROOT, "train_online_dpo.py"), *SMALL, "--max_steps", "1",
                                 "--train_data", str(prompts), "--output_dir", str(folder)],
                                env=ENV, capture_output=True, text=True, timeout=300)
        assert result.returncode == 2 and f"{prompts}: line 2 is not UTF-8 text" in result.stderr, result.stderr[-2000:]
        assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "new").exists()  # the folders it created are gone
    assert existing.is_dir() and os.listdir(existing) == []  # a folder that was there stays, without the lock


@pytest.fixture()
def small_disk(tmp_path):
    """Mounts a 16 KiB tmpfs where a path's folder would be: a real full disk (needs root and mount)."""
    mounted = []

    def mount(path):
        os.makedirs(path, exist_ok=True)
        if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(path)],
                                               capture_output=True).returncode != 0:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        mounted.append(path)
    yield mount
    for path in mounted:
        subprocess.run(["umount", str(path)], check=False)


def test_a_full_disk_at_the_final_weights_is_one_line_naming_the_intact_checkpoint(tiny_pipe, tmp_path, small_disk,
                                                                                   capsys, monkeypatch):
    from accelerate import Accelerator

    from policy import Policy

    config = run_config.parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, SMALL)
    policy = Policy(config, tiny_pipe, Accelerator(cpu=True))
    out = str(tmp_path / "run")
    checkpoint = policy.save_checkpoint(out, 3, None)
    small_disk(os.path.join(out, "lora"))  # the LoRA (~100 KB) does not fit
    line = cli_error(lambda argv: policy.save_final(out), [], capsys, monkeypatch)
    weights = os.path.join(out, "lora", "pytorch_lora_weights.safetensors")
    assert line.startswith(f"train_online_dpo.py: final weights not written: {weights}: the disk is full (errno 28 ENOSPC")
    assert line.endswith(f"the checkpoint {checkpoint} is intact; free some space and export it with: "
                         f"python export_checkpoint.py --checkpoint {checkpoint}")
    assert os.listdir(os.path.join(out, "lora")) == []  # no cut-off weights file passes for the run's


def test_the_export_of_a_full_fine_tune_is_refused_before_creating_anything(tmp_path, capsys, monkeypatch):
    import export_checkpoint

    run = str(tmp_path / "run")
    config = run_config.parse_config(train_online_dpo.Config, train_online_dpo.PRESETS,
                                     SMALL + ["--output_dir", run, "--train_mode", "full"])
    write_checkpoint(run, 1, config)
    before = sorted(os.listdir(run))
    line = cli_error(export_checkpoint.main, ["--checkpoint", os.path.join(run, "checkpoint-1")], capsys, monkeypatch,
                     "export_checkpoint.py")
    assert "config field `checkpoint`:" in line and "is a full fine-tune (train_mode 'full'): there is no LoRA to export" in line
    assert os.path.join(run, "transformer") in line
    assert sorted(os.listdir(run)) == before  # no empty lora-1/


@pytest.mark.slow
def test_every_exported_lora_is_the_adapter_its_card_describes_the_ema_with_eval_with_ema(tmp_path):
    """A 2-step run with eval_with_ema: checkpoints at 1 and 2, the final lora/; the export of a
    checkpoint and the final lora/ hold the EMA adapter exactly, and their cards say so."""
    from safetensors.torch import load_file

    import export_checkpoint

    out = str(tmp_path / "run")
    train_online_dpo.main(SMALL + ["--output_dir", out, "--max_steps", "2", "--eval_with_ema", "true",
                                   "--checkpoint_every", "1", "--eval_every", "1", "--max_eval_prompts", "1",
                                   "--eval_samples_per_prompt", "1", "--sample_grid_every", "0"])

    def adapter(checkpoint, name):  # {module.lora_A.weight: tensor} of one adapter in a checkpoint
        saved = load_file(os.path.join(checkpoint, "trainable.safetensors"))
        return {k.replace(f".{name}.", "."): v for k, v in saved.items() if f".{name}." in k}

    def lora(folder):  # the diffusers file's keys without its "transformer." prefix
        return {k.removeprefix("transformer."): v for k, v in
                load_file(os.path.join(folder, "pytorch_lora_weights.safetensors")).items()}

    exported = export_checkpoint.main(["--checkpoint", os.path.join(out, "checkpoint-1"),
                                       "--output_dir", str(tmp_path / "export-1")])
    final = os.path.join(out, "lora")
    for folder, checkpoint in ((exported, "checkpoint-1"), (final, "checkpoint-2")):
        ema, trained = adapter(os.path.join(out, checkpoint), "ema"), adapter(os.path.join(out, checkpoint), "default")
        weights = lora(folder)
        assert weights.keys() == ema.keys() and len(ema) > 0
        assert all(torch.equal(weights[k], ema[k]) for k in ema), folder
        assert max(float((ema[k] - trained[k]).abs().max()) for k in ema) > 1e-4  # the EMA is not the trained adapter
        card = open(os.path.join(folder, "README.md")).read()
        assert "Weights: the EMA of the trained LoRA (eval_with_ema" in card and "the evaluation below used it too" in card
