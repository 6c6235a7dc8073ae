"""Checkpoints: full (unsharded) state dicts through torch.distributed.checkpoint, which handles a
plain module, DDP and FSDP2 alike; written to a temporary directory and renamed into place, so a
checkpoint-STEP folder is complete by construction. Also what a resume must keep: the
weight-defining config fields (plus the knobs the script names), compared before anything loads.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile

import torch

from run_config import InputError, WriteError, describe_os_error, differing_fields, require, require_writable_dir

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "train_state.json")

# Config fields that define what the trained weights are: a resume that changes one of them would
# train (or load into) something else, so it is refused. Every other field (learning rate, max_steps,
# evaluation, logging, ...) may change on resume. Extend this tuple when a field changes what the
# weights mean (a field missing from an older checkpoint's config counts as its default).
WEIGHT_DEFINING_FIELDS = ("pretrained", "train_mode", "lora_rank", "lora_alpha", "lora_targets", "lora_init",
                          "objective", "eval_with_ema", "eval_ema_decay")
# ... and the `knobs` a script adds (the online trainer: its objective's own knobs, objectives.OBJECTIVES[
# name].knobs, which decide what the checkpoint holds and what the update optimises; this module does
# not know the objectives). The LoRA fields count only when both runs train LoRA:
LORA_ONLY_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_init")


def state_dict_options(**kw):
    """Full (unsharded) state dicts, offloaded to the CPU: what a checkpoint holds on any layout."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def trainable_state(model, optimizer, also_frozen: tuple[str, ...] = ()):
    """(model state of trainable parameters, optimizer state), full tensors on CPU. Collective:
    every rank calls it. also_frozen: name fragments of frozen parameters saved too (the old-policy
    LoRA adapter, ".old.")."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=state_dict_options())
    kept = {name for name, _ in _saved_params(model, also_frozen)}
    return {k: v for k, v in model_state.items() if k in kept}, optim_state


def _saved_params(model, also_frozen: tuple[str, ...] = ()):
    """(name, parameter) of what a checkpoint holds: the trainable parameters and the frozen ones
    whose names contain a fragment of also_frozen."""
    return [(name, p) for name, p in _named_params(model)
            if p.requires_grad or any(fragment in name for fragment in also_frozen)]


def _named_params(model):
    inner = getattr(model, "module", model)
    return inner.named_parameters()


def assert_finite(state: dict, what: str):
    bad = [name for name, tensor in state.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if bad:
        raise FloatingPointError(f"{what}: {len(bad)} non-finite tensor(s), e.g. {bad[0]}; not saved")


def save_checkpoint(output_dir: str, step: int, model, optimizer, lr_scheduler, train_state: dict,
                    is_main: bool, limit: int | None = None, extra_writer=None, run_config: dict | None = None,
                    also_frozen: tuple[str, ...] = ()) -> str | None:
    """Writes output_dir/checkpoint-STEP atomically (all ranks call it; rank 0 writes): the files
    go to a temporary .checkpoint-STEP-* folder, renamed into place when all are written, so a
    checkpoint-STEP folder is complete by construction. `run_config` goes to its config.json (what
    a resume compares against). also_frozen: see trainable_state."""
    model_state, optim_state = trainable_state(model, optimizer, also_frozen)
    if not is_main:
        return None
    assert_finite(model_state, f"checkpoint at step {step}")
    os.makedirs(output_dir, exist_ok=True)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    from safetensors.torch import save_file

    tmp, file = None, os.path.join(output_dir, f".checkpoint-{step}-*")
    try:  # any OSError (a full disk): the partial folder goes, one line names the file (cli: exit 2)
        tmp = tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=output_dir)
        file = os.path.join(tmp, "trainable.safetensors")
        save_file({k: v.contiguous() for k, v in model_state.items()}, file)
        file = os.path.join(tmp, "optimizer.pt")
        torch.save({"optimizer": optim_state, "lr_scheduler": lr_scheduler.state_dict()}, file)
        if run_config is not None:
            file = os.path.join(tmp, "config.json")
            with open(file, "w") as f:
                json.dump(run_config, f, indent=1)
        file = os.path.join(tmp, "train_state.json")
        with open(file, "w") as f:
            json.dump({**train_state, "step": step}, f, indent=1)
        if extra_writer is not None:
            file = tmp
            extra_writer(tmp)
        file = final
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    except Exception as error:  # safetensors and torch.save report a failed write in their own types
        reason = write_failure(error, output_dir)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if reason is None:
            raise
        raise WriteError(f"checkpoint at step {step} not written: {file}: {reason}; the run stops here (the "
                         "checkpoints already on disk are complete)") from error
    if limit:
        for old in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def write_failure(error: Exception, folder: str) -> str | None:
    """What went wrong when a checkpoint file could not be written, or None when `error` is not a write
    failure. safetensors raises SafetensorError ("I/O error: No space left on device (os error 28)")
    and torch.save a RuntimeError ("unexpected pos ...") on a full disk, so those are recognised by
    their text and by the free space left."""
    if isinstance(error, OSError):
        return describe_os_error(error)
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if "os error 28" in text or "No space left" in text or (free is not None and free < 1 << 20):
        return f"the disk is full (errno 28 ENOSPC; {free} bytes free; {type(error).__name__}: {text})"
    if "I/O error" in text:
        return f"{type(error).__name__}: {text}"
    return None


def list_checkpoints(output_dir: str) -> list[str]:
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir) if (m := CHECKPOINT_RE.match(name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def checkpoint_problem(path: str) -> str | None:
    """None for a complete checkpoint folder, else what is wrong (naming the file). Cheap: reads the
    JSON, the safetensors header (which must fit the file's size) and the zip index of optimizer.pt
    (at the end of the file, so a cut-off file has none)."""
    import zipfile

    from safetensors import safe_open

    if not os.path.isdir(path):
        return "no such directory"
    for name in CHECKPOINT_FILES:
        if not os.path.isfile(os.path.join(path, name)):
            return f"{os.path.join(path, name)} is missing"
    file = os.path.join(path, "train_state.json")
    try:
        with open(file) as f:
            if not isinstance(json.load(f).get("step"), int):
                return f"{file} has no integer `step`"
        file = os.path.join(path, "trainable.safetensors")
        with safe_open(file, "pt") as f:
            f.keys()
        file = os.path.join(path, "optimizer.pt")
        with zipfile.ZipFile(file):
            pass
    except Exception as error:  # json, safetensors and zipfile raise different types for damaged files
        return f"{file} is damaged ({type(error).__name__}: {error})"
    return None


def resolve_checkpoint(spec: str, output_dir: str, report=print) -> str | None:
    """"" -> None; "latest" -> the newest complete checkpoint in output_dir (damaged newer ones are
    skipped and reported), or None when there is none; a path -> itself if complete."""
    if not spec:
        return None
    if spec == "latest":
        for path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            report(f"resume_from_checkpoint latest: skipping {path}: {problem}")
        return None  # the caller says what happens next (a fresh run, or a refusal when the folder holds a run)
    problem = checkpoint_problem(spec)
    if problem:
        raise FileNotFoundError(f"resume_from_checkpoint: {spec!r} is not a complete checkpoint: {problem}")
    return spec


def load_checkpoint(path: str, model, optimizer, lr_scheduler, also_frozen: tuple[str, ...] = ()) -> dict:
    """Restores trainable weights (and the frozen ones named by also_frozen), optimizer and
    scheduler; returns train_state (with `step`). The saved weights must match those parameters
    exactly (names and shapes)."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_state_dict

    file = os.path.join(path, "trainable.safetensors")
    try:
        model_state = load_file(file)
        file = os.path.join(path, "optimizer.pt")
        saved = torch.load(file, map_location="cpu", weights_only=True)
        file = os.path.join(path, "train_state.json")
        with open(file) as f:
            train_state = json.load(f)
    except Exception as error:
        raise InputError(f"resume_from_checkpoint: cannot read {file} ({type(error).__name__}: {error})") from None
    expected = {name: tuple(p.shape) for name, p in _saved_params(model, also_frozen)}
    found = {name: tuple(t.shape) for name, t in model_state.items()}
    problems = [f"missing {n}" for n in sorted(expected.keys() - found.keys())]
    problems += [f"unexpected {n}" for n in sorted(found.keys() - expected.keys())]
    problems += [f"{n}: saved {found[n]}, model {expected[n]}" for n in sorted(expected.keys() & found.keys())
                 if found[n] != expected[n]]
    if problems:
        raise InputError(f"resume_from_checkpoint: {os.path.join(path, 'trainable.safetensors')} does not fit the "
                         f"trainable parameters ({len(problems)} problem(s), e.g. {'; '.join(problems[:3])})")
    # strict=False only because the saved state holds the trainable (and also_frozen) parameters alone (checked above)
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=saved["optimizer"],
                   options=state_dict_options(strict=False))
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    return train_state


def config_changes(saved: dict, config, knobs: tuple[str, ...] = ()) -> list[str]:
    """'field: old -> new' for each WEIGHT_DEFINING_FIELDS entry and each of the script's `knobs` that
    differs between a checkpoint's saved config and this run's (LoRA fields only when both train LoRA)."""
    both_lora = "lora" in (saved.get("train_mode", "lora"), config.train_mode)
    names = [name for name in WEIGHT_DEFINING_FIELDS + tuple(knobs)
             if both_lora or name not in LORA_ONLY_FIELDS]
    return [f"{name}: {old!r} -> {new!r}" for name, old, new in differing_fields(saved, config, names)]


def check_resume_config(checkpoint: str, config, knobs: tuple[str, ...] = ()):
    """Refuses a resume whose weight-defining fields (and `knobs`) differ from the checkpoint's (before
    loading)."""
    file = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(file):  # written by an older version: the strict load still checks names and shapes
        return
    with open(file) as f:
        saved = json.load(f)
    changes = config_changes(saved, config, knobs)
    if changes:
        raise InputError(f"resume_from_checkpoint: {checkpoint} was trained with other weight-defining settings "
                         f"({'; '.join(changes)}); resume with the checkpoint's values or start a new run in "
                         "another output_dir")


def validate_output_and_resume(config):
    """The run folder's rules that need no accelerator: it is writable; an explicit resume path is a
    complete checkpoint; resuming and overwriting exclude each other."""
    require(not (config.overwrite_output_dir and config.resume_from_checkpoint), "overwrite_output_dir",
            "cannot be combined with resume_from_checkpoint (one continues the run in output_dir, the other deletes it)")
    spec = config.resume_from_checkpoint
    if spec and spec != "latest":
        problem = checkpoint_problem(spec)
        require(problem is None, "resume_from_checkpoint", f"{spec!r} is not a complete checkpoint: {problem}")
    require_output_outside_inputs(config)
    require_writable_dir(config.output_dir, "output_dir", create=False)  # created when the run starts (launch)


def _inside(path: str, folder: str) -> bool:
    """path is folder or lies inside it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def require_output_outside_inputs(config):
    """output_dir is never a model folder or a folder the run reads: not equal to / inside a local
    `pretrained` or a train / eval data folder, and no model_index.json in it (whatever
    overwrite_output_dir says): a run there would write over, or with --overwrite_output_dir delete,
    what the user owns."""
    out = config.output_dir
    for field in ("pretrained", "train_data", "pairs_path", "eval_data"):
        source = getattr(config, field, "")
        if source and os.path.isdir(source):
            require(not _inside(out, source), "output_dir", f"{out!r} is the {field} folder {source!r} or inside it: a run "
                                                           "never writes into what it reads; choose another output_dir")
    require(not os.path.isfile(os.path.join(out, "model_index.json")), "output_dir",
            f"{out!r} holds a model (model_index.json): a run never writes into or deletes from a model folder; "
            "choose another output_dir")
