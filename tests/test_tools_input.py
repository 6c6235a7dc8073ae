"""Bad input to the tools (evaluate.py, generate.py, make_offline_pairs.py, the trainers' LoRA size)
fails as one line naming the flag or file, exit status 2, before any model loads or any sampling;
and the small pure helpers behind it: the thread chooser, the requirements check of the Makefile."""

import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate
import generate
import perf
import qwen_image
import run_config
from conftest import ROOT
from data_process import make_offline_pairs


def one_line_exit_2(main, args, capsys) -> str:
    """run_config.cli(main, args): exits 2 with one stderr line, no traceback -> that line."""
    with pytest.raises(SystemExit) as exit_info:
        run_config.cli(main, args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err.strip()


def eval_args(tmp_path, *extra):
    return ["--preset", "cpu_tiny", "--output_dir", str(tmp_path / "eval"), *extra]


def generate_args(tmp_path, *extra):
    return ["--pretrained", "tiny", "--prompt", "a red square", "--height", "64", "--width", "64",
            "--output_dir", str(tmp_path / "gen"), *extra]


def pairs_args(tmp_path, *extra):
    return ["--preset", "cpu_tiny", "--output", str(tmp_path / "pairs.parquet"), *extra]


# ---- 1 and 5: max_prompts < 0, chunk_size / num_inference_steps 0: one check for every sampling tool

@pytest.mark.parametrize("tool,args", [(evaluate.main, eval_args), (generate.main, generate_args),
                                       (make_offline_pairs.main, pairs_args)])
@pytest.mark.parametrize("flag,value,rule", [("max_prompts", "-5", "must be >= 0 (0 = all prompts)"),
                                             ("chunk_size", "0", "must be >= 1"),
                                             ("num_inference_steps", "0", "must be >= 1")])
def test_sampling_flags_are_checked_alike_by_every_sampling_tool(tool, args, flag, value, rule, tmp_path, capsys):
    line = one_line_exit_2(tool, args(tmp_path, f"--{flag}", value), capsys)
    assert line.endswith(f"config field `{flag}`: {rule}"), line


# ---- 2: a LoRA of another model, or a safetensors that is not a LoRA

def write_safetensors(path, tensors: dict):
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file(tensors, path)


def tiny_lora_dir(tmp_path, rank: int = 2) -> str:
    """A real LoRA of the tiny model, saved as the trainers export it."""
    pipe = qwen_image.build_tiny_pipeline(seed=0)
    qwen_image.add_lora(pipe.transformer, rank, rank, qwen_image.TINY_LORA_TARGETS)
    folder = str(tmp_path / "tiny-lora")
    qwen_image.save_lora(pipe.transformer, folder)
    return folder


def test_the_shapes_read_before_loading_are_the_loaded_models(tiny_dir, tiny_pipe, tmp_path):
    loaded = qwen_image.linear_shapes(tiny_pipe.transformer)
    assert run_config.transformer_linear_shapes(run_config.transformer_config("tiny")) == loaded  # tiny preset
    assert run_config.transformer_linear_shapes(run_config.transformer_config(tiny_dir)) == loaded  # a local folder
    folder = tiny_lora_dir(tmp_path)
    lora = evaluate.lora_shapes(os.path.join(folder, "pytorch_lora_weights.safetensors"))
    assert lora["transformer_blocks.0.attn.to_q"] == loaded["transformer_blocks.0.attn.to_q"] == (32, 32)
    assert evaluate.lora_mismatch(os.path.join(folder, "pytorch_lora_weights.safetensors"), loaded) is None
    evaluate.require_lora_fits(folder, "tiny", "lora_dir")  # its own model: no error
    evaluate.require_lora_fits(folder, tiny_dir, "lora_dir")


def test_a_lora_of_another_model_is_refused_in_one_line_before_sampling(tmp_path, capsys):
    # the shape of a LoRA trained on tiny-bench (inner width 128) given to the tiny model (32)
    folder = str(tmp_path / "bench-lora")
    file = os.path.join(folder, "pytorch_lora_weights.safetensors")
    write_safetensors(file, {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 128),
                             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(128, 2)})
    expected = (f"{file} does not fit the model 'tiny': transformer_blocks.0.attn.to_q is 128 -> 128 in the LoRA "
                "but 32 -> 32 in the model (a LoRA trained on another model?)")
    line = one_line_exit_2(evaluate.main, eval_args(tmp_path, "--lora_dir", folder), capsys)
    assert line == f"{os.path.basename(sys.argv[0])}: config field `lora_dir`: {expected}"
    line = one_line_exit_2(generate.main, generate_args(tmp_path, "--lora", folder), capsys)
    assert line.endswith(f"config field `lora`: {expected}"), line
    assert not os.path.exists(tmp_path / "eval" / "eval.json") and not os.path.exists(tmp_path / "gen" / "grid.png")


def test_a_lora_naming_modules_the_model_lacks_is_refused(tmp_path, capsys):
    folder = str(tmp_path / "other-lora")
    write_safetensors(os.path.join(folder, "pytorch_lora_weights.safetensors"),
                      {"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32),
                       "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(32, 2)})
    line = one_line_exit_2(evaluate.main, eval_args(tmp_path, "--lora_dir", folder), capsys)
    assert "1 of its 1 LoRA modules are not Linear layers of the model (first: single_transformer_blocks.0.attn.to_q)" in line


def test_a_safetensors_that_is_not_a_lora_or_not_safetensors_is_refused(tmp_path, capsys):
    folder = str(tmp_path / "not-lora")
    file = os.path.join(folder, "pytorch_lora_weights.safetensors")
    write_safetensors(file, {"transformer.proj_out.weight": torch.zeros(64, 32)})
    line = one_line_exit_2(generate.main, generate_args(tmp_path, "--lora", folder), capsys)
    assert line.endswith(f"config field `lora`: {file} does not fit the model 'tiny': it holds no LoRA tensors "
                         "(keys like transformer.MODULE.lora_A.weight): not a LoRA (a LoRA trained on another model?)")
    with open(file, "wb") as f:
        f.write(b"not a safetensors file at all")
    line = one_line_exit_2(evaluate.main, eval_args(tmp_path, "--lora_dir", folder), capsys)
    assert f": {file}: not a safetensors file (" in line, line


# ---- 3: make_offline_pairs --output DIR

def test_make_offline_pairs_refuses_a_folder_as_output_before_the_rollouts(tmp_path, capsys):
    folder = tmp_path / "pairs_dir"
    folder.mkdir()
    (folder / "mine.txt").write_text("the user's")
    line = one_line_exit_2(make_offline_pairs.main, ["--preset", "cpu_tiny", "--output", str(folder),
                                                     "--overwrite_output", "true"], capsys)
    assert f"config field `output`: {str(folder)!r} is a folder; give the parquet file to write" in line, line
    assert (folder / "mine.txt").read_text() == "the user's" and not os.path.exists(f"{folder}.tmp")


def test_write_pairs_never_leaves_its_temporary_file_behind(tmp_path):
    from pairs_format import write_pairs

    folder = tmp_path / "pairs_dir"
    folder.mkdir()
    row = {"prompt": "p", "chosen_image": b"x", "rejected_image": b"y", "chosen_score": 1.0, "rejected_score": 0.0}
    with pytest.raises(OSError):  # the rename onto a folder fails after the parquet was written
        write_pairs([row], str(folder))
    assert os.listdir(tmp_path) == ["pairs_dir"] and os.listdir(folder) == []
    write_pairs([row], str(tmp_path / "ok.parquet"))
    assert sorted(os.listdir(tmp_path)) == ["ok.parquet", "pairs_dir"]


# ---- 4: a LoRA too big for the memory

def test_the_lora_parameter_count_from_the_config_is_what_add_lora_adds():
    pipe = qwen_image.build_tiny_pipeline(seed=0)
    shapes = qwen_image.linear_shapes(pipe.transformer)
    counted = run_config.lora_parameter_count(run_config.transformer_linear_shapes(run_config.transformer_config("tiny")),
                                              qwen_image.TINY_LORA_TARGETS, 8)
    dead = [m for m in qwen_image.dead_text_stream_modules(pipe.transformer)
            if any(m == t or m.endswith("." + t) for t in qwen_image.TINY_LORA_TARGETS)]
    added = sum(p.numel() for p in qwen_image.add_lora(pipe.transformer, 8, 8, qwen_image.TINY_LORA_TARGETS))
    assert counted == added + sum(8 * sum(shapes[m]) for m in dead)  # an upper bound: add_lora skips dead modules
    # the real Qwen-Image's published dims: rank 64 on the recipe's targets
    real = run_config.transformer_linear_shapes(run_config.transformer_config("Qwen/Qwen-Image"))
    assert real["transformer_blocks.0.attn.to_q"] == (3072, 3072) and real["txt_in"] == (3584, 3072)


def test_a_lora_rank_too_big_for_the_memory_is_refused_naming_the_gb(tmp_path, capsys):
    targets = ",".join(qwen_image.TINY_LORA_TARGETS)
    run_config.require_lora_fits_memory("tiny", targets, 8, available=10**9)  # 8 KB-ish: fits
    with pytest.raises(run_config.ConfigError, match=r"config field `lora_rank`: rank 100000 gives .* LoRA parameters, "
                                                     r"which need \d+\.\d GB .*; 1\.0 GB of memory is available"):
        run_config.require_lora_fits_memory("tiny", targets, 100000, available=10**9)
    import train_online_dpo

    line = one_line_exit_2(train_online_dpo.main, ["--preset", "cpu_tiny", "--lora_rank", "1000000000",
                                                   "--output_dir", str(tmp_path / "run")], capsys)
    assert "config field `lora_rank`: rank 1000000000 gives" in line and " GB of memory is available" in line, line
    assert not os.path.exists(tmp_path / "run" / "lora")


# ---- 6: the Makefile's "requirements already met" check

def requirements_met(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, os.path.join(ROOT, "requirements_met.py"), str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


def test_requirements_met_is_true_here_and_false_for_a_missing_package(tmp_path):
    result = requirements_met(os.path.join(ROOT, "requirements.txt"))  # the suite runs: all is installed
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr
    needs = tmp_path / "requirements.txt"
    needs.write_text("# a comment\n\nnumpy>=1  # inline comment\nno-such-package-h2==1.0\n")
    result = requirements_met(needs)
    assert result.returncode == 1 and result.stdout == "requirements: no-such-package-h2: not installed\n"
    needs.write_text("numpy<1\n")
    assert requirements_met(needs).returncode == 1


def test_the_makefile_uses_the_check_and_tries_the_torch_index_once():
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    assert "$(PYTHON) requirements_met.py || $(PYTHON) -m pip install -r requirements.txt" in makefile
    assert "--index-url $(TORCH_INDEX) --timeout 5 --retries 0 ||" in makefile


# ---- 7: threads on a shared CPU

@pytest.mark.parametrize("load,cores,threads", [(0.0, 16, 16), (0.3, 16, 16), (4.4, 16, 12), (1.2, 4, 3),
                                                (5.9, 2, 1), (1.6, 2, 1), (0.0, 1, 1), (100.0, 64, 1)])
def test_choose_threads_takes_the_idle_cores_and_one_when_they_are_busy(load, cores, threads):
    assert perf.choose_threads(load, cores) == threads


def test_omp_num_threads_overrides_the_choice(monkeypatch, capsys):
    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert perf.set_cpu_threads("cpu") is None and torch.get_num_threads() == before
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert perf.set_cpu_threads("cuda") is None
    try:
        threads = perf.set_cpu_threads("cpu")
        assert 1 <= threads <= perf.physical_cores() and torch.get_num_threads() == threads
        assert capsys.readouterr().out.startswith(f"cpu threads: {threads} (")
    finally:
        torch.set_num_threads(before)
