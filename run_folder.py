"""The run folder (output_dir): what a training run writes there and what makes a folder a run
(`run_entries`, `is_run_dir`, the run marker), the lock a live run holds on it (`lock_run_dir`,
`release_run_dir`, removing what an unused run created), and the checks before any model loads
(`prepare_output_dir`: overwrite, `resume_from_checkpoint latest`, `resume_plan`). run_lifecycle.py
calls these from `launch`, `start_run` and the run's end.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

from checkpoints import check_resume_config, list_checkpoints, resolve_checkpoint
from distributed import all_sum
from evaluation import check_resume_eval_settings


# What a training run writes into output_dir: what --overwrite_output_dir may delete (and names), in a
# folder that holds a run (is_run_dir), never elsewhere.
RUN_ENTRIES = ("config.json", "metrics.jsonl", "lora", "transformer", "samples")
LOCK_FILE = ".lock"  # held (fcntl.flock) by the run's rank 0 while the run lives: see lock_run_dir
# The run marker: config.json holding these fields (every trainer's Config has them) next to metrics.jsonl;
# start_run writes both before anything else.
RUN_MARKER_FIELDS = ("output_dir", "max_steps", "train_mode", "resume_from_checkpoint", "overwrite_output_dir")


def is_run_dir(output_dir: str) -> bool:
    """output_dir holds a training run of this project: its config.json is a JSON object with the
    trainers' fields RUN_MARKER_FIELDS, and metrics.jsonl lies next to it. Only such a folder is
    resumed or, with --overwrite_output_dir, emptied of its run's entries."""
    try:
        with open(os.path.join(output_dir, "config.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):  # missing, unreadable or not JSON: not a run's config
        return False
    return (isinstance(saved, dict) and all(field in saved for field in RUN_MARKER_FIELDS)
            and os.path.isfile(os.path.join(output_dir, "metrics.jsonl")))


def run_entries(output_dir: str) -> list[str]:
    """The names in output_dir that a training run writes (sorted; checkpoints by step)."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in RUN_ENTRIES if os.path.exists(os.path.join(output_dir, n))]
    return names + [os.path.basename(p) for p in list_checkpoints(output_dir)]


def deletable_run_entries(output_dir: str) -> list[str]:
    """What --overwrite_output_dir deletes: the run's own entries (run_entries; lora/ or transformer/
    as the train_mode in its config.json says), and nothing in a folder that holds no run."""
    if not is_run_dir(output_dir):
        return []
    with open(os.path.join(output_dir, "config.json")) as f:
        not_written = "transformer" if json.load(f)["train_mode"] == "lora" else "lora"
    return [name for name in run_entries(output_dir) if name != not_written]


_RUN_LOCK = None  # the open lock file of this process's run (one run at a time per process)
# What lock_run_dir created and the run has not used yet: {"dir", "top" (the outermost folder it
# made, or None), "lock" (whether it created the lock file)}; start_run clears it (the run writes)
_UNUSED = None


def lock_run_dir(output_dir: str):
    """An exclusive fcntl.flock on output_dir/.lock for the life of the run, with who holds it (pid,
    host, start time, command) written inside: a second run into the same folder is refused (it would
    interleave metrics.jsonl, config.json and the checkpoints). The kernel drops the lock when the
    process dies, so a killed run never blocks its own resume; a later run in this process (tests,
    notebooks) first releases the previous one's. What it creates (the folders, the lock file) is
    removed again when the run ends before writing anything (discard_unused_run_dir)."""
    import atexit
    import fcntl
    import socket
    import time

    global _RUN_LOCK, _UNUSED
    release_run_dir()
    top, probe = None, os.path.abspath(output_dir)
    while not os.path.exists(probe):  # the outermost folder makedirs will create
        top, probe = probe, os.path.dirname(probe)
    path = os.path.join(output_dir, LOCK_FILE)
    lock_existed = os.path.exists(path)
    os.makedirs(output_dir, exist_ok=True)
    handle = open(path, "a+")
    _UNUSED = {"dir": output_dir, "top": top, "lock": not lock_existed}
    atexit.unregister(discard_unused_run_dir)
    atexit.register(discard_unused_run_dir)  # an error exit (cli: status 2) before the run wrote anything
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by a live process (BlockingIOError)
        handle.seek(0)
        holder = handle.read().strip().replace("\n", "; ") or "a process that has not written its name yet"
        handle.close()
        _UNUSED = None  # the lock file is the holder's
        raise FileExistsError(f"output_dir {output_dir!r} is in use by another run ({holder}); wait for it to end, "
                              "stop it, or choose another output_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
                 f"command: {' '.join(sys.argv)}\n")
    handle.flush()
    _RUN_LOCK = handle


def release_run_dir():
    """Ends this process's hold on its run folder (the end of a run; also done by the kernel at exit);
    a run that wrote nothing leaves nothing behind (discard_unused_run_dir)."""
    global _RUN_LOCK
    if _RUN_LOCK is not None:
        _RUN_LOCK.close()  # closing the descriptor releases the flock
        _RUN_LOCK = None
    discard_unused_run_dir()


def discard_unused_run_dir():
    """A run that ended (an error, a refusal) before writing its first file: the lock file it created
    and the folders lock_run_dir made are removed; only empty folders go (os.rmdir), and a folder or
    lock file that existed before the run is never removed."""
    global _UNUSED
    unused, _UNUSED = _UNUSED, None
    if unused is None:
        return
    try:
        if unused["lock"]:
            os.remove(os.path.join(unused["dir"], LOCK_FILE))
        if unused["top"] is not None:
            path = os.path.abspath(unused["dir"])
            while True:
                os.rmdir(path)  # fails (and stops) on a folder that holds anything
                if path == unused["top"]:
                    break
                path = os.path.dirname(path)
    except OSError:
        pass


def mark_run_dir_used():
    """The run writes into its folder from now on (start_run): it is the run's, kept whatever happens."""
    global _UNUSED
    _UNUSED = None


def prepare_output_dir(config, accelerator, knobs: tuple[str, ...] = ()):
    """Before any model loads. The folder is created and locked (rank 0: lock_run_dir). A folder that
    holds entries a run writes (run_entries) but no run (is_run_dir) is refused, whatever the flags:
    nothing in it is written over or deleted. A fresh run refuses a folder that holds a run (naming
    what is there) unless `overwrite_output_dir` (the run's own entries are deleted:
    deletable_run_entries, nothing else); `resume_from_checkpoint latest` is resolved here to the
    newest complete checkpoint (or "" when there is none in a folder without a run) and the resume
    says how many steps it will run (resume_plan); a resume whose weight-defining config (or `knobs`)
    or eval settings differ from the checkpoint's is refused; orphaned .checkpoint-* folders of a run
    (a kill mid-save) are removed. A refusal leaves nothing behind (discard_unused_run_dir)."""
    output_dir = config.output_dir
    refusal = None
    if accelerator.is_main_process:
        try:
            lock_run_dir(output_dir)
        except FileExistsError as error:
            refusal = error
    if all_sum(accelerator, float(refusal is not None))[0] > 0:  # every rank leaves, not only rank 0
        raise refusal or FileExistsError(f"output_dir {output_dir!r} is in use by another run (see rank 0)")
    try:
        doomed = check_output_dir(config, accelerator, knobs)
    except BaseException:
        release_run_dir()  # the folder and lock file this run created go again
        raise
    accelerator.wait_for_everyone()  # every rank has looked before rank 0 changes anything
    if accelerator.is_main_process:
        if doomed:
            kept = [name for name in os.listdir(output_dir) if name not in doomed and name != LOCK_FILE
                    and not name.startswith(".checkpoint-")]
            accelerator.print(f"overwrite_output_dir: deleting {', '.join(doomed)} in {output_dir}"
                              + (f"; keeping {', '.join(sorted(kept))} (not written by a training run's "
                                 "code; tracker logs included)" if kept else ""))
        is_run = is_run_dir(output_dir)
        for name in os.listdir(output_dir):
            path = os.path.join(output_dir, name)
            orphan = is_run and name.startswith(".checkpoint-")
            if orphan or name in doomed:
                if orphan:
                    accelerator.print(f"removing {path}: an unfinished checkpoint (the run was killed while saving)")
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    accelerator.wait_for_everyone()


def check_output_dir(config, accelerator, knobs: tuple[str, ...] = ()) -> list[str]:
    """prepare_output_dir's checks (nothing changes on disk): -> the entries --overwrite_output_dir
    deletes ([] without it). Resolves resume_from_checkpoint latest."""
    output_dir = config.output_dir
    existing = run_entries(output_dir)
    if existing and not is_run_dir(output_dir):
        raise FileExistsError(f"output_dir {output_dir!r} holds {', '.join(existing)} but no run of this project (a "
                              f"config.json with the trainers' fields next to metrics.jsonl): nothing in it is written "
                              "over or deleted, whatever --overwrite_output_dir says; choose another output_dir")
    report = accelerator.print if accelerator.is_main_process else lambda m: None
    if config.resume_from_checkpoint == "latest":
        checkpoint = resolve_checkpoint("latest", output_dir, report=report)
        if checkpoint is None and existing:
            raise FileExistsError(f"resume_from_checkpoint latest: output_dir {output_dir!r} holds a run "
                                  f"({', '.join(existing)}) but no complete checkpoint to resume; pass "
                                  "--overwrite_output_dir true to replace it or choose another output_dir")
        if checkpoint is None:
            report(f"resume_from_checkpoint latest: no complete checkpoint in {output_dir!r} (and no run); "
                   "starting a fresh run")
        # the run's config.json records which checkpoint it continued from
        config.resume_from_checkpoint = checkpoint or ""
    elif existing and not config.resume_from_checkpoint and not config.overwrite_output_dir:
        raise FileExistsError(f"output_dir {output_dir!r} already holds a run ({', '.join(existing)}): pass "
                              "--resume_from_checkpoint latest to continue it, --overwrite_output_dir true to "
                              "replace it, or choose another output_dir")
    if config.resume_from_checkpoint:
        check_resume_config(config.resume_from_checkpoint, config, knobs)
        check_resume_eval_settings(config.resume_from_checkpoint, config)
        report(resume_plan(config, config.resume_from_checkpoint))
    return deletable_run_entries(output_dir) if config.overwrite_output_dir else []


def resume_plan(config, checkpoint: str) -> str:
    """'resuming at step 10 of 20: 10 steps to run (max_steps 20 from the preset cpu_tiny; the run that
    wrote the checkpoint had max_steps 12)': said before any model loads, because a resume without
    --max_steps takes the preset's or the default value, not the run's."""
    import run_config

    with open(os.path.join(checkpoint, "train_state.json")) as f:
        step = json.load(f)["step"]
    argv = run_config.LAST_ARGV
    preset = run_config.flag_value(argv, "preset")
    presets = getattr(sys.modules.get(type(config).__module__), "PRESETS", {})
    if run_config.flag_value(argv, "max_steps") is not None:
        source = "from --max_steps"
    elif preset and "max_steps" in presets.get(preset, {}):
        source = f"from the preset {preset}"
    else:
        source = "the default"
    saved = {}
    for path in (os.path.join(checkpoint, "config.json"), os.path.join(config.output_dir, "config.json")):
        if os.path.isfile(path):
            with open(path) as f:
                saved = json.load(f)
            break
    left = config.max_steps - step
    return (f"resuming at step {step} of {config.max_steps}: "
            + (f"{left} steps to run" if left > 0 else "nothing left to train")
            + f" (max_steps {config.max_steps} {source}"
            + (f"; the run that wrote the checkpoint had max_steps {saved['max_steps']}" if "max_steps" in saved else "")
            + ")")
