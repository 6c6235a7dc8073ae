"""Issue 34, item 4: no run poisons the next. A run that ends by an exception (a stop signal during a
rollout's reward, a reward back end that fails) in a process that goes on (a notebook, a test, a
script calling main() twice) leaves nothing behind: the next run in that process logs the same
numbers as the same run in a fresh process, and the process's own Ctrl-C handling is back."""

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
import torch

import rewards
import run_folder
import run_lifecycle
import train_online_dpo
from conftest import ROOT

SCRIPT = os.path.join(ROOT, "train_online_dpo.py")
# the run that is compared: 2 steps, a step-0 and a step-2 eval (eval/reward_gain), a checkpoint
SECOND = ["--preset", "cpu_tiny", "--prompts_per_step", "2", "--samples_per_prompt", "2", "--max_steps", "2",
          "--eval_every", "2", "--max_eval_prompts", "2", "--eval_samples_per_prompt", "2", "--checkpoint_every", "2",
          "--sample_grid_every", "0", "--reward", "jpeg_compressibility", "--seed", "7"]
# the run that ends by an exception: the OCR server reward on the text world's prompts
FIRST = ["--preset", "cpu_tiny", "--prompts_per_step", "2", "--samples_per_prompt", "2", "--max_steps", "4",
         "--eval_every", "0", "--checkpoint_every", "0", "--rollout_chunk_size", "2",
         "--train_data", os.path.join(ROOT, "data", "text_world", "train.txt"),
         "--eval_data", os.path.join(ROOT, "data", "text_world", "eval.txt")]
WALL_CLOCK = ("time/", "perf/")  # the only logged numbers allowed to differ between two runs


class OcrServer:
    """A chat-completions server on 127.0.0.1 that answers "ABC" to its first `answered` requests and
    then, by `then`: "sigint" sends SIGINT to this process (Ctrl-C during the reward) and answers,
    "fail" answers HTTP 400 (the reward raises RuntimeError)."""

    def __init__(self, answered: int, then: str):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        server = self
        self.requests, self.answered, self.then = 0, answered, then
        self.count_lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                with server.count_lock:
                    server.requests += 1
                    late = server.requests > server.answered
                if late and server.then == "fail":
                    self.send_error(400)
                    return
                if late and server.requests == server.answered + 1:
                    os.kill(os.getpid(), signal.SIGINT)
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
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def logged_numbers(output_dir: str) -> list[dict]:
    """metrics.jsonl less the wall-clock entries, one dict per line."""
    with open(os.path.join(output_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in row.items() if not k.startswith(WALL_CLOCK)} for row in rows]


def fresh_process_run(output_dir: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, SCRIPT, *SECOND, "--output_dir", output_dir], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return logged_numbers(output_dir)


@pytest.fixture()
def one_thread():
    """In-process runs on 1 torch thread, as the fresh process (OMP_NUM_THREADS=1): the same sums."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def handlers():
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def leftovers(handlers_before: dict) -> dict:
    """What a run left in this process: {what: its value}; {} when nothing."""
    left = {"signal handlers": handlers()} if handlers() != handlers_before else {}
    if rewards.CALLS_CANCELLED.is_set():
        left["rewards.CALLS_CANCELLED"] = True
    for module, name in ((run_lifecycle, "_STOP"), (run_lifecycle, "_ON_ABANDON"), (run_folder, "_RUN_LOCK")):
        if getattr(module, name) is not None:
            left[f"{module.__name__}.{name}"] = getattr(module, name)
    torch_state = {"threads": torch.get_num_threads(), "default dtype": torch.get_default_dtype(),
                   "grad enabled": torch.is_grad_enabled(),
                   "deterministic": torch.are_deterministic_algorithms_enabled()}
    expected = {"threads": 1, "default dtype": torch.float32, "grad enabled": True, "deterministic": False}
    left.update({f"torch {k}": v for k, v in torch_state.items() if v != expected[k]})  # one_thread's 1 thread
    return left


@pytest.mark.parametrize("ending", ["sigint", "fail"])
def test_a_run_ended_by_an_exception_leaves_the_next_run_as_in_a_fresh_process(tmp_path, one_thread, ending):
    before = handlers()
    with OcrServer(answered=4, then=ending) as server:  # step 1's 2 x 2 images scored; step 2's reward ends the run
        argv = FIRST + ["--output_dir", str(tmp_path / "first"), "--reward", "ocr_server",
                        "--reward_kwargs", json.dumps({"base_url": server.url, "concurrency": 1, "max_retries": 0})]
        if ending == "sigint":  # the run ends cleanly with step 1's checkpoint (StepAbandoned)
            train_online_dpo.main(argv)
            assert os.path.isdir(tmp_path / "first" / "checkpoint-1")
        else:  # the reward's error leaves main()
            with pytest.raises(RuntimeError, match="HTTP 400"):
                train_online_dpo.main(argv)
    left = leftovers(before)
    train_online_dpo.main(SECOND + ["--output_dir", str(tmp_path / "after")])
    after = logged_numbers(str(tmp_path / "after"))
    assert [row["step"] for row in after] == [0, 1, 2, 2, 2]  # eval 0, steps 1-2, eval 2, final checksums
    assert "eval/reward_gain" in after[-2] and "final/param_checksums" in after[-1]
    assert after == fresh_process_run(str(tmp_path / "fresh"))  # exactly: same ops, same order, one thread
    assert left == {}
    assert leftovers(before) == {}


def test_two_clean_runs_in_one_process_equal_two_fresh_processes(tmp_path, one_thread):
    before = handlers()
    train_online_dpo.main(SECOND + ["--output_dir", str(tmp_path / "one")])
    assert leftovers(before) == {}
    train_online_dpo.main(SECOND + ["--output_dir", str(tmp_path / "two")])
    first, second = logged_numbers(str(tmp_path / "one")), logged_numbers(str(tmp_path / "two"))
    assert second == first == fresh_process_run(str(tmp_path / "fresh"))
