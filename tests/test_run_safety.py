"""Issue 21, "nothing lost, nothing mislabelled": the run folder is locked for the life of a run, an
overwrite deletes only what it names, a refused run leaves no folder, a resume keeps the eval
settings, a stop says how to continue, side writes that fail cost no checkpoint, and bad input or a
full disk is one line with exit status 2."""

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

import run_config
import run_folder
import run_lifecycle
import train_online_dpo
from conftest import ROOT

SCRIPT = os.path.join(ROOT, "train_online_dpo.py")
SMALL = ["--preset", "cpu_tiny", "--prompts_per_step", "2", "--samples_per_prompt", "2", "--eval_every", "0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def config_for(argv):
    return run_config.parse_config(train_online_dpo.Config, train_online_dpo.PRESETS, argv)


def prepare(argv):
    """The real accelerator and run-folder preparation of a launch (no model loads)."""
    from distributed import make_accelerator

    config = config_for(argv)
    accelerator = make_accelerator(config)
    try:
        run_folder.prepare_output_dir(config, accelerator, train_online_dpo.objective_knobs(config))
    finally:
        getattr(run_folder, "release_run_dir", lambda: None)()  # (absent before the lock existed)
    return config


def test_a_second_run_into_a_locked_folder_is_refused_and_a_dead_holders_lock_is_not(tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time, run_folder; "
                               f"run_folder.lock_run_dir({out!r}); print('locked', flush=True); time.sleep(120)"],
                              cwd=ROOT, env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        second = subprocess.run([sys.executable, SCRIPT, *SMALL, "--max_steps", "1", "--output_dir", out],
                                env=ENV, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-2000:]
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "is in use by another run" in lines[0] and f"pid {holder.pid}" in lines[0], lines
        assert "Traceback" not in second.stderr
        assert sorted(os.listdir(out)) == [".lock"]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing anything: the kernel dropped its flock, a new run takes the folder
    run_folder.lock_run_dir(out)
    try:
        with open(os.path.join(out, ".lock")) as f:
            assert f"pid {os.getpid()} " in f.read()
    finally:
        run_folder.release_run_dir()


def write_run_marker(out, config):
    """What makes a folder a run (run_folder.is_run_dir): the run's config.json next to metrics.jsonl."""
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(run_config.config_dict(config), f)
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write("{}\n")


def test_overwrite_deletes_only_the_entries_it_names(tmp_path, capsys):
    out = tmp_path / "run"
    write_run_marker(out, config_for(SMALL + ["--output_dir", str(out)]))
    (out / "checkpoint-1").mkdir()
    (out / "wandb").mkdir()
    (out / "wandb" / "my-notes.txt").write_text("mine")
    (out / "qwen-image-online-dpo").mkdir()  # a tensorboard project folder
    prepare(SMALL + ["--output_dir", str(out), "--overwrite_output_dir", "true"])
    printed = capsys.readouterr().out
    assert "deleting config.json, metrics.jsonl, checkpoint-1 in" in printed
    assert "keeping qwen-image-online-dpo, wandb" in printed
    assert (out / "wandb" / "my-notes.txt").read_text() == "mine"
    assert sorted(os.listdir(out)) == ["qwen-image-online-dpo", "wandb"]  # the lock file left with the run


def test_a_refused_run_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "new" / "run"
    with pytest.raises(ValueError, match="samples_per_prompt"):
        train_online_dpo.main(SMALL + ["--output_dir", str(out), "--samples_per_prompt", "1"])
    assert not (tmp_path / "new").exists()
    with pytest.raises(ValueError, match="config field `output_dir`: folder '/dev/null/run' is not writable"):
        train_online_dpo.main(SMALL + ["--output_dir", "/dev/null/run"])


def write_checkpoint(out, step, config):
    """A complete checkpoint in the trainer's format (checkpoints.checkpoint_problem accepts it)."""
    from safetensors.torch import save_file

    path = os.path.join(out, f"checkpoint-{step}")
    os.makedirs(path)
    save_file({"w": torch.zeros(1)}, os.path.join(path, "trainable.safetensors"))
    torch.save({"optimizer": {}, "lr_scheduler": {}}, os.path.join(path, "optimizer.pt"))
    with open(os.path.join(path, "train_state.json"), "w") as f:
        json.dump({"step": step}, f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(run_config.config_dict(config), f)


def test_a_resume_that_changes_an_eval_setting_is_refused_naming_both_values(tmp_path):
    out = str(tmp_path / "run")
    first = config_for(SMALL + ["--output_dir", out])
    write_checkpoint(out, 2, first)
    write_run_marker(out, first)
    with open(os.path.join(out, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 0, "eval/reward_mean": 0.5, "eval/rewards": [0.5]}) + "\n")
    other = os.path.join(ROOT, "data", "text_world", "eval.txt")
    with pytest.raises(ValueError, match=rf"eval_data: '{first.eval_data}' -> '{other}'"):
        prepare(SMALL + ["--output_dir", out, "--resume_from_checkpoint", "latest", "--eval_data", other])
    with pytest.raises(ValueError, match=r"max_eval_prompts: 0 -> 2"):
        prepare(SMALL + ["--output_dir", out, "--resume_from_checkpoint", "latest", "--max_eval_prompts", "2"])
    # the same settings (other fields may change) resume
    config = prepare(SMALL + ["--output_dir", out, "--resume_from_checkpoint", "latest", "--learning_rate", "1e-3"])
    assert config.resume_from_checkpoint == os.path.join(out, "checkpoint-2")


def test_latest_without_a_checkpoint_says_one_thing(tmp_path, capsys):
    out = tmp_path / "run"
    prepare(SMALL + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"])  # empty: a fresh run
    assert "starting a fresh run" in capsys.readouterr().out
    write_run_marker(out, config_for(SMALL + ["--output_dir", str(out)]))
    with pytest.raises(FileExistsError, match="holds a run .* but no complete checkpoint"):
        prepare(SMALL + ["--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert "starting a fresh run" not in capsys.readouterr().out  # not announced, then refused


def test_the_resume_command_is_the_original_flags_with_latest():
    config = config_for(SMALL + ["--output_dir", "out dir", "--overwrite_output_dir", "true", "--beta", "50"])
    command = run_lifecycle.resume_command(config)
    assert shlex.split(command) == ["python", os.path.relpath(SCRIPT), *SMALL, "--output_dir", "out dir", "--beta", "50",
                                    "--resume_from_checkpoint", "latest"]
    config = config_for(["--preset", "cpu_tiny", "--resume_from_checkpoint=latest"])
    assert shlex.split(run_lifecycle.resume_command(config))[2:] == [
        "--preset", "cpu_tiny", "--output_dir", "outputs/online_dpo", "--resume_from_checkpoint", "latest"]


@pytest.mark.slow
def test_a_stop_prints_the_resume_command_and_a_resume_with_nothing_left_says_so(tmp_path, capsys):
    out = str(tmp_path / "stop")
    proc = subprocess.Popen([sys.executable, SCRIPT, *SMALL, "--output_dir", out, "--max_steps", "500",
                             "--checkpoint_every", "0"], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 180
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-2000:]
    step = int([d for d in os.listdir(out) if d.startswith("checkpoint-")][0].split("-")[1])
    command = stdout.split("to continue:\n", 1)[1].splitlines()[0].strip()
    argv = shlex.split(command)
    assert argv[:2] == ["python", os.path.relpath(SCRIPT)] and argv[-2:] == ["--resume_from_checkpoint", "latest"]
    train_online_dpo.main(argv[2:] + ["--max_steps", str(step)])
    printed = capsys.readouterr().out
    assert f"nothing left to train: resumed at step {step} and max_steps is {step}" in printed
    assert "done:" not in printed


@pytest.fixture()
def full_disk(tmp_path):
    """A 64 KiB tmpfs: a real full disk (needs root and mount; skipped elsewhere)."""
    path = tmp_path / "full"
    path.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield str(path)
    subprocess.run(["umount", str(path)], check=False)


def test_a_checkpoint_on_a_full_disk_is_one_line_naming_the_file_and_leaves_no_partial_folder(full_disk):
    from checkpoints import list_checkpoints, save_checkpoint

    model = torch.nn.Linear(256, 256)  # 257 KB of weights: more than the disk holds
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    with pytest.raises(run_config.WriteError) as raised:
        save_checkpoint(full_disk, 10, model, optimizer, scheduler, {}, is_main=True)
    message = str(raised.value)
    assert message.startswith("checkpoint at step 10 not written: ") and "trainable.safetensors" in message
    assert "the disk is full (errno 28 ENOSPC" in message and "\n" not in message
    assert os.listdir(full_disk) == [] and list_checkpoints(full_disk) == []


def test_a_full_disk_anywhere_is_one_line_and_exit_status_2(capsys, monkeypatch):
    import stat

    if not stat.S_ISCHR(os.stat("/dev/full").st_mode):
        pytest.skip("no /dev/full")

    def main(argv):
        with open("/dev/full", "w") as f:  # writes fail with ENOSPC on Linux
            f.write("x")
    monkeypatch.setattr(sys, "argv", ["train_online_dpo.py"])
    with pytest.raises(SystemExit) as raised:
        run_config.cli(main)
    assert raised.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("train_online_dpo.py: the disk is full (errno 28 ENOSPC)"), err


@pytest.mark.slow
def test_failed_grid_writes_warn_once_and_cost_no_checkpoint(tmp_path, monkeypatch, capsys):
    """A full disk while the eval / sample grids are written (PIL's save raises ENOSPC for samples/):
    the run warns once per kind, naming the file, and still writes its checkpoint and weights."""
    from PIL import Image

    import run_logs

    out = str(tmp_path / "run")
    real_save = Image.Image.save

    def save(image, fp, *args, **kwargs):
        if isinstance(fp, str) and os.sep + "samples" + os.sep in fp:
            raise OSError(errno.ENOSPC, "No space left on device", fp)
        return real_save(image, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save)
    monkeypatch.setattr(run_logs, "_WARNED", set(), raising=False)
    train_online_dpo.main(SMALL + ["--output_dir", out, "--max_steps", "2", "--eval_every", "1",
                                   "--checkpoint_every", "2", "--sample_grid_every", "1", "--max_eval_prompts", "2"])
    err = capsys.readouterr().err
    samples = os.path.join(out, "samples")
    assert err.count("warning: could not write the eval grid") == 1  # evals at steps 0, 1, 2: warned once
    assert f"eval grid {os.path.join(samples, 'eval-000000.png')} (the disk is full (errno 28 ENOSPC))" in err
    assert err.count("warning: could not write the sample grid") == 1
    assert os.listdir(samples) == []
    assert os.path.isfile(os.path.join(out, "checkpoint-2", "trainable.safetensors"))
    assert os.path.isfile(os.path.join(out, "lora", "pytorch_lora_weights.safetensors"))


def cli_error(argv, capsys, monkeypatch) -> str:
    """The trainer's command line in-process (run_config.cli): exit status 2 and one line on stderr."""
    monkeypatch.setattr(sys, "argv", ["train_online_dpo.py", *argv])
    capsys.readouterr()
    with pytest.raises(SystemExit) as raised:
        run_config.cli(train_online_dpo.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert raised.value.code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


def test_bad_data_and_model_paths_are_one_line(tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = SMALL + ["--max_steps", "1"]
    # a truncated parquet (a copy cut off mid-way): pyarrow's ArrowInvalid, named
    whole, cut = tmp_path / "whole.parquet", tmp_path / "cut.parquet"
    pq.write_table(pa.table({"prompt": [f"prompt {i}" for i in range(100)]}), whole)
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    line = cli_error(base + ["--output_dir", str(tmp_path / "a"), "--train_data", str(cut)], capsys, monkeypatch)
    assert f"{cut}: cannot be read (ArrowInvalid: Parquet magic bytes not found" in line
    # an empty folder
    (tmp_path / "empty").mkdir()
    line = cli_error(base + ["--output_dir", str(tmp_path / "b"), "--train_data", str(tmp_path / "empty")], capsys, monkeypatch)
    assert line.endswith(f"config field `train_data`: folder '{tmp_path / 'empty'}' holds no .parquet / .jsonl / "
                         ".json / .txt files")
    # a typo'd local path that is shaped like a Hub id, offline: it does not exist, without retries
    start = time.perf_counter()
    line = cli_error(base + ["--output_dir", str(tmp_path / "c"), "--train_data", "mydata/prompts"], capsys, monkeypatch)
    assert "config field `train_data`: 'mydata/prompts' does not exist as a local path, and Hub dataset ids cannot be " \
           "read offline" in line
    assert time.perf_counter() - start < 10
    # --pretrained: a folder that is not a pipeline, a path that does not exist (checked before loading)
    line = cli_error(base + ["--output_dir", str(tmp_path / "d"), "--pretrained", str(tmp_path / "empty")], capsys, monkeypatch)
    assert f"config field `pretrained`: folder '{tmp_path / 'empty'}' has no model_index.json" in line
    line = cli_error(base + ["--output_dir", str(tmp_path / "e"), "--pretrained", "./no/such/model"], capsys, monkeypatch)
    assert "config field `pretrained`: './no/such/model' does not exist" in line
    line = cli_error(base + ["--output_dir", str(tmp_path / "f"), "--pretrained", "someone/not-cached-model"], capsys, monkeypatch)
    assert "the Hub cache has no copy of it to use offline" in line
    assert not [d for d in os.listdir(tmp_path) if d in "bcdef"]  # refused before the run folder exists


class HangingOcrServer:
    """A chat-completions server on 127.0.0.1 that answers its first `answered` requests ("ABC") and
    then holds every later request open without answering (a hung OCR back end)."""

    def __init__(self, answered: int = 0):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        server = self
        self.requests, self.answered, self.release = 0, answered, threading.Event()
        self.hanging = threading.Event()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                server.requests += 1
                if server.requests > server.answered:
                    server.hanging.set()
                    server.release.wait(120)  # hung
                    return
                body = json.dumps({"choices": [{"message": {"content": "ABC"}}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        import threading

        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()


def test_the_server_rewards_limits_are_the_ones_it_applies(capsys):
    from PIL import Image

    from rewards import ServerOcrReward

    with HangingOcrServer() as server:
        reward = ServerOcrReward(base_url=server.url, timeout=0.3, max_retries=2, backoff=0.1, deadline=600,
                                 progress_every=0.4)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"failed after 3 attempt\(s\)"):
            reward([Image.new("RGB", (8, 8))], ['a "ABC" sign'])
        elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 1.2 + 0.5  # 3 x 0.3 s + 0.1 + 0.2 s backoff: it gave up at 1.2 s, not at 600 s
    printed = capsys.readouterr().out  # and said so while it waited (it used to say "deadline 600 s")
    assert "each image gives up after 1.2 s (3 attempt(s) of up to 0.3 s" in printed, printed
    assert reward.request_limit == pytest.approx(3 * 0.3 + 0.1 + 0.2)
    assert ServerOcrReward().request_limit == 4 * 60 + 1 + 2 + 4  # the defaults: 247 s, not the 600 s deadline


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_reward_server_fails_before_the_model_loads(tmp_path, capsys, monkeypatch):
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused
    start = time.perf_counter()
    line = cli_error(SMALL + ["--output_dir", str(tmp_path / "run"), "--reward", "ocr_server",
                              "--train_data", os.path.join(ROOT, "data", "text_world", "train.txt"),
                              "--eval_data", os.path.join(ROOT, "data", "text_world", "eval.txt"),
                              "--reward_kwargs", json.dumps({"base_url": url})], capsys, monkeypatch)
    assert line.startswith(f"train_online_dpo.py: config field `reward`: OCR server {url} cannot be reached "
                           "(ConnectionRefusedError"), line
    assert time.perf_counter() - start < 10 and not (tmp_path / "run").exists()


def test_stop_flag_abandons_abandonable_work_at_once():
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        stop = run_lifecycle.StopFlag()
        stop.abandonable(3)
        with pytest.raises(run_lifecycle.StepAbandoned) as raised:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert raised.value.steps_done == 3 and stop.raised
        with pytest.raises(KeyboardInterrupt, match="second SIGINT"):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        stop = run_lifecycle.StopFlag()
        stop.abandonable(3)
        stop.not_abandonable()  # an update: the signal only asks for a stop after it
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.2)
        assert stop.raised
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.slow
@pytest.mark.parametrize("overlap", ["false", "true"])  # true: the hung call is on perf.OverlappedScorer's thread
def test_ctrl_c_while_the_reward_server_hangs_stops_at_once_with_the_last_steps_checkpoint(tmp_path, overlap):
    from safetensors.torch import load_file

    out = str(tmp_path / "run")
    with HangingOcrServer(answered=4) as server:  # step 1's 2 prompts x 2 samples are scored, step 2's hang
        proc = subprocess.Popen(
            [sys.executable, SCRIPT, *SMALL, "--output_dir", out, "--max_steps", "5", "--checkpoint_every", "0",
             "--reward", "ocr_server", "--reward_kwargs", json.dumps({"base_url": server.url, "concurrency": 4}),
             "--reward_overlap", overlap, "--rollout_chunk_size", "2",
             "--train_data", os.path.join(ROOT, "data", "text_world", "train.txt"),
             "--eval_data", os.path.join(ROOT, "data", "text_world", "eval.txt")],
            env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert server.hanging.wait(240), "the trainer never reached step 2's reward"
        time.sleep(0.5)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
        took = time.monotonic() - signalled
    assert proc.returncode == 0, stderr[-3000:]
    assert took < 30, took  # not the reward's 247 s
    assert "SIGINT: abandoning the rollout / reward / eval in progress; the run ends with the weights of step 1" in stderr
    assert "stop signal: checkpoint written at step 1 (step 2 abandoned)" in stdout
    assert "--resume_from_checkpoint latest" in stdout.split("to continue:")[1]
    assert sorted(d for d in os.listdir(out) if "checkpoint" in d) == ["checkpoint-1"]
    with open(os.path.join(out, "checkpoint-1", "train_state.json")) as f:
        assert json.load(f)["step"] == 1
    assert load_file(os.path.join(out, "checkpoint-1", "trainable.safetensors"))  # complete, loadable
    with open(os.path.join(out, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1]  # step 2 logged nothing


def test_the_end_of_run_load_line_runs_without_deprecated_arguments(tiny_dir, tmp_path):
    """The summary's "load it" command for a model folder (as for Qwen/Qwen-Image), run up to the LoRA load
    with diffusers' deprecation warnings as errors (torch_dtype= is deprecated in favour of dtype=)."""
    import re
    import types

    config = types.SimpleNamespace(pretrained=tiny_dir, train_mode="lora", max_steps=1, output_dir=str(tmp_path))
    summary = run_lifecycle.run_summary(config, str(tmp_path / "lora"), [])
    load = re.search(r"load it:  python -c '(.*)'$", summary, re.M).group(1)
    assert "pipe.load_lora_weights" in load
    load = load.split("; pipe.load_lora_weights")[0] + "; print(pipe.transformer.dtype)"
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", load], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("torch.bfloat16")
