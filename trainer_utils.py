"""What both training scripts (and evaluate.py) share: config parsing with presets, prompt data, the
per-step data stream, the accelerator, atomic checkpoints, metric logging, sample grids, evaluation,
and a clean stop on SIGTERM. The policy and its updates live in policy.py and objectives.py; the
scripts keep what differs: where the training latents come from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile

import torch
from PIL import Image, ImageDraw

import qwen_image  # cheap: it imports diffusers inside its functions

# ----------------------------------------------------------------------------------------------
# Config

TINY_PROMPTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tiny_prompts.txt")
# What both trainers' `cpu_tiny` presets share: the tiny random Qwen-Image on a CPU with a reward it
# can learn (DESIGN.md's recipe: LoRA on attention, the image MLP and proj_out; lr 3e-2).
CPU_TINY_OVERRIDES = dict(
    pretrained="tiny", dtype="float32", lora_rank=8, lora_alpha=8, gradient_checkpointing=False,
    lora_targets=",".join(qwen_image.TINY_LORA_TARGETS),
    eval_data=TINY_PROMPTS, height=64, width=64, max_sequence_length=64, eval_inference_steps=4,
    eval_samples_per_prompt=4, rollout_chunk_size=32, reward="brightness", learning_rate=3e-2, log_with="none",
)

# The shipped text-rendering world (build_text_world.py): a tiny Qwen-Image pretrained to draw
# 3-letter capital words at 32x64, scored by the real PP-OCRv5 reward. What the trainers' and
# make_offline_pairs' `text_world` presets share.
ROOT = os.path.dirname(os.path.abspath(__file__))
TEXT_WORLD = os.path.join(ROOT, "worlds", "text_world")
TEXT_WORLD_DATA = os.path.join(ROOT, "data", "text_world")
TEXT_WORLD_OVERRIDES = dict(
    pretrained=TEXT_WORLD, dtype="float32", gradient_checkpointing=False,
    eval_data=os.path.join(TEXT_WORLD_DATA, "eval.txt"),
    height=32, width=64, max_sequence_length=64, eval_inference_steps=8,
    eval_samples_per_prompt=8, rollout_chunk_size=32, reward="ocr", log_with="none",
    lora_rank=8, lora_alpha=8, lora_targets=",".join(qwen_image.TINY_LORA_TARGETS),
)


class InputError(ValueError):
    """Bad input that the message names (a data file and line or row, a checkpoint): `cli` prints it as
    one line and exits with status 2, as it does a refused run folder (FileExistsError)."""


class ConfigError(InputError):
    """An invalid flag or value: `cli` prints its one-line message and exits with status 2."""


def field_comments(config_cls) -> dict[str, str]:
    """{field name: its trailing `# comment`} read from the dataclass source: the comment is the help
    text (fields keep plain `name: type = default` lines, no `field(metadata=...)`)."""
    import inspect
    import io
    import tokenize

    try:
        source = inspect.getsource(config_cls)
    except (OSError, TypeError):
        return {}
    comments, line_tokens = {}, []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in (tokenize.NEWLINE, tokenize.ENDMARKER):
            # a field line: NAME ':' ... with a comment somewhere on its (logical) line
            names = [t for t in line_tokens if t.type not in (tokenize.INDENT, tokenize.DEDENT, tokenize.NL)]
            if len(names) >= 2 and names[0].type == tokenize.NAME and names[1].string == ":":
                texts = [t.string.lstrip("#").strip() for t in names if t.type == tokenize.COMMENT]
                if texts:
                    comments[names[0].string] = " ".join(texts)
            line_tokens = []
        elif token.type != tokenize.COMMENT or line_tokens:  # comment-only lines are section titles
            line_tokens.append(token)
    return comments


def _describe_presets(presets: dict[str, dict]) -> str:
    if not presets:
        return ""
    lines = ["presets (--preset NAME applies these overrides first; explicit flags win):"]
    for name, overrides in presets.items():
        lines.append(f"  {name}: " + " ".join(f"--{k} {v}" for k, v in overrides.items()))
    return "\n".join(lines)


def build_parser(config_cls, presets: dict[str, dict], description: str | None = None):
    """HfArgumentParser with each field's source comment as its help, the defaults and the presets."""
    import argparse

    from transformers import HfArgumentParser

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = HfArgumentParser(config_cls, description=description, epilog=_describe_presets(presets),
                              formatter_class=Formatter)
    comments = field_comments(config_cls)
    types = {f.name: getattr(f.type, "__name__", str(f.type)) for f in dataclasses.fields(config_cls)}
    for action in parser._actions:
        name = action.dest
        if name in types and not action.help:
            action.help = comments.get(name) or f"{types[name]}; see the knobs tables in README.md"
            if name == "preset":
                action.help = f"a named group of overrides, applied first: {', '.join(presets) or 'none'} (listed below)"
    return parser


def parse_config(config_cls, presets: dict[str, dict], argv: list[str] | None = None, defaults: dict | None = None,
                 description: str | None = None):
    """Every dataclass field is a CLI flag (transformers' HfArgumentParser). `defaults` (e.g. read from
    a run's config.json) apply first, then `--preset NAME`'s overrides; flags given explicitly win.
    Unknown flags (with the closest field suggested) and unparsable values raise ConfigError."""
    import difflib

    argv = list(sys.argv[1:] if argv is None else argv)
    if description is None:  # the script's docstring heads its --help
        description = getattr(sys.modules.get(config_cls.__module__), "__doc__", None)
    parser = build_parser(config_cls, presets, description)

    def error(message):  # argparse would print the usage and exit: one line instead
        match = re.match(r"argument --([\w-]+)(?:/--[\w-]+)?: (.*)", message)
        raise ConfigError(f"config field `{match.group(1)}`: {match.group(2)}" if match else message)
    parser.error = error

    known = {option for option in parser._option_string_actions if option.startswith("--")}
    for arg in argv:
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            fields = sorted(option for option in known if "-" not in option[2:])
            close = difflib.get_close_matches("--" + flag[2:].replace("-", "_"), fields, n=1, cutoff=0.6)
            raise ConfigError(f"unknown flag `{flag}`" + (f"; did you mean `{close[0]}`?" if close else
                                                          "; see --help for the fields"))
    if defaults:
        parser.set_defaults(**defaults)
    preset = _flag_value(argv, "preset")
    if preset:
        if preset not in presets:
            raise ConfigError(f"config field `preset`: unknown preset {preset!r}; known: {', '.join(presets) or 'none'}")
        parser.set_defaults(**presets[preset])
    (config,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return config


def cli(main, argv=None, input_errors: tuple = ()):
    """The scripts' entry point: a config error, bad input (InputError, or a script's own
    `input_errors`) or a refused run folder prints one line to stderr and exits with status 2 (no
    traceback)."""
    try:
        return main(argv)
    except (InputError, FileExistsError, *input_errors) as error:
        print(f"{os.path.basename(sys.argv[0])}: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as error:  # a second Ctrl-C / SIGTERM (StopFlag) or Ctrl-C before training
        print(f"{os.path.basename(sys.argv[0])}: interrupted{f' ({error})' if str(error) else ''}", file=sys.stderr)
        sys.exit(130)


def _flag_value(argv, name):
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def require(condition: bool, field: str, rule: str):
    """Config validation: raise ConfigError (a ValueError) naming the field and the rule it breaks."""
    if not condition:
        raise ConfigError(f"config field `{field}`: {rule}")


def validate_policy_config(config, world_size: int = 1):
    """The rules both trainers share: model, LoRA, DPO, optimiser, evaluation, logging."""
    from pairing import PAIR_STRATEGIES, SIGMA_SCHEMES

    require(config.micro_batch_pairs >= 1, "micro_batch_pairs",
            "must be >= 1: a micro-batch holds whole (chosen, rejected) pairs, never half of one")
    require(math.isfinite(config.beta) and config.beta > 0, "beta", "must be a finite number > 0")
    validate_reward(config.reward, config.reward_kwargs)
    require(not getattr(config, "push_to_hub", False) or bool(getattr(config, "hub_model_id", "").strip()),
            "hub_model_id", "push_to_hub needs a repository id (--hub_model_id user/name)")
    require(getattr(config, "pair_strategy", PAIR_STRATEGIES[0]) in PAIR_STRATEGIES, "pair_strategy",
            f"must be one of {PAIR_STRATEGIES}")
    # the online trainer also takes "" (the objective's official scheme) and the group objectives' schemes
    schemes = SIGMA_SCHEMES + (("", "sampler", "sampler_stratified") if hasattr(config, "objective") else ())
    require(config.sigma_scheme in schemes, "sigma_scheme", f"must be one of {', '.join(repr(x) for x in schemes)}")
    require(getattr(config, "min_reward_margin", 0.0) >= 0, "min_reward_margin", "must be >= 0")
    require(config.train_mode in ("lora", "full"), "train_mode", "must be 'lora' or 'full'")
    require(config.sharding in ("none", "fsdp2"), "sharding", "must be 'none' or 'fsdp2'")
    require(config.dtype in ("bfloat16", "float32", "float16"), "dtype", "must be bfloat16, float16 or float32")
    require(config.height % 16 == 0 and config.height > 0, "height", "must be a positive multiple of 16")
    require(config.width % 16 == 0 and config.width > 0, "width", "must be a positive multiple of 16")
    require(config.eval_inference_steps >= 1, "eval_inference_steps", "must be >= 1")
    require(1 <= config.max_sequence_length <= 1024, "max_sequence_length", "must be in [1, 1024]")
    require(config.true_cfg_scale >= 1.0, "true_cfg_scale", "must be >= 1 (1 disables CFG)")
    require(config.lora_rank >= 1 and config.lora_alpha > 0, "lora_rank", "rank must be >= 1 and alpha > 0")
    require(config.lora_init in qwen_image.LORA_INITS, "lora_init",
            f"must be one of {', '.join(sorted(qwen_image.LORA_INITS))}: inits that rewrite the base weights "
            "(pissa, olora, ...) would make 'adapters disabled' differ from the base model, the reference")
    require(bool(config.lora_targets.strip()) or config.train_mode == "full", "lora_targets", "must name modules")
    require(math.isfinite(config.learning_rate) and config.learning_rate > 0, "learning_rate", "must be a finite number > 0")
    require(math.isfinite(config.weight_decay) and config.weight_decay >= 0, "weight_decay", "must be a finite number >= 0")
    for field in ("adam_beta1", "adam_beta2"):
        require(0 <= getattr(config, field) < 1, field, "must be in [0, 1)")
    require(math.isfinite(config.adam_epsilon) and config.adam_epsilon > 0, "adam_epsilon",
            "must be a finite number > 0 (with 0, a parameter without gradient divides 0 by 0)")
    require(config.max_grad_norm > 0, "max_grad_norm", "must be > 0")
    require(config.max_steps >= 1, "max_steps", "must be >= 1")
    require(config.max_nonfinite_in_a_row >= 1, "max_nonfinite_in_a_row", "must be >= 1")
    for field in ("eval_every", "checkpoint_every", "checkpoints_total_limit", "max_eval_prompts", "lr_warmup_steps"):
        require(getattr(config, field) >= 0, field, "must be >= 0 (0 disables)")
    require(config.eval_samples_per_prompt >= 1, "eval_samples_per_prompt", "must be >= 1")
    require(config.log_with in ("wandb", "tensorboard", "none"), "log_with", "must be wandb, tensorboard or none")
    require(data_source_exists(config.eval_data), "eval_data", f"file {config.eval_data!r} does not exist")
    check_eval_baseline(config)
    validate_output_and_resume(config)


# The trainer fields an eval depends on (evaluate.py --run_dir takes these from a run). With the same
# values and `attention_backend`, two runs' step-0 evals are the same per-image rewards (at step 0 the
# policy is the base model: LoRA starts at B = 0 and `lora_init` only allows inits that keep the base
# weights), so a run may take another's (`eval_baseline`) instead of spending the eval again.
EVAL_SETTINGS = ("pretrained", "dtype", "eval_data", "max_eval_prompts", "reward", "reward_kwargs",
                 "eval_samples_per_prompt", "height", "width", "eval_inference_steps", "true_cfg_scale",
                 "negative_prompt", "max_sequence_length", "rollout_chunk_size")


def check_eval_baseline(config):
    """`eval_baseline`, before any model loads: a run folder whose metrics.jsonl holds a step-0 eval
    with per-image rewards, and whose config.json agrees on EVAL_SETTINGS and `attention_backend`."""
    where = config.eval_baseline
    if not where:
        return
    path = os.path.join(where, "config.json")
    require(os.path.isfile(path), "eval_baseline", f"{path!r} does not exist (a run folder is expected)")
    require(baseline_eval(where) is not None, "eval_baseline",
            f"{os.path.join(where, 'metrics.jsonl')!r} has no step-0 eval with per-image rewards (eval/rewards)")
    try:
        with open(path) as f:
            saved = json.load(f)
    except json.JSONDecodeError as error:
        raise ConfigError(f"config field `eval_baseline`: {path!r} is not valid JSON ({error})") from None
    changes = [f"{name}: {there!r} there, {here!r} here"
               for name, there, here in differing_fields(saved, config, EVAL_SETTINGS + ("attention_backend",))]
    require(not changes, "eval_baseline", f"{where!r} evaluated under other settings ({'; '.join(changes)})")


def baseline_eval(run_dir: str) -> dict | None:
    """The step-0 eval row of run_dir/metrics.jsonl (its eval/* values), or None. Read up to that row
    only: the run may still be writing (or have been killed mid-write) further down."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise InputError(f"{path}: line {number} is not a JSON object; repair or remove it") from None
            if row.get("step") == 0 and "eval/rewards" in row:
                return {k: v for k, v in row.items() if k.startswith("eval/")}
    return None


def data_source_exists(spec: str) -> bool:
    """A local path that exists, or a Hub dataset id (`owner/name`; read through `datasets`)."""
    from data_process.records import source_exists

    return source_exists(spec)


def validate_reward(spec: str, reward_kwargs: str):
    """`reward`: a name or weighted components ("ocr:1.0,pickscore:0.2"); `reward_kwargs`: a JSON
    object, keyed by component name when the spec has several components."""
    from rewards import parse_reward_spec

    try:
        components = parse_reward_spec(spec)
    except ValueError as error:
        raise ConfigError(f"config field `reward`: {error}") from None
    try:
        kwargs = json.loads(reward_kwargs)
    except json.JSONDecodeError as error:
        raise ConfigError(f"config field `reward_kwargs`: not valid JSON ({error})") from None
    require(isinstance(kwargs, dict), "reward_kwargs", "must be a JSON object")
    names = [name for name, _ in components]
    if len(names) > 1:
        require(set(kwargs) <= set(names), "reward_kwargs",
                f"with several rewards, keys must be component names {names}, got {sorted(kwargs)}")


def validate_output_and_resume(config):
    """The run folder's rules that need no accelerator: it is writable; an explicit resume path is a
    complete checkpoint; resuming and overwriting exclude each other."""
    require(not (config.overwrite_output_dir and config.resume_from_checkpoint), "overwrite_output_dir",
            "cannot be combined with resume_from_checkpoint (one continues the run in output_dir, the other deletes it)")
    spec = config.resume_from_checkpoint
    if spec and spec != "latest":
        problem = checkpoint_problem(spec)
        require(problem is None, "resume_from_checkpoint", f"{spec!r} is not a complete checkpoint: {problem}")
    require_writable_dir(config.output_dir, "output_dir")


def require_writable_dir(path: str, field: str):
    """Creates `path` if needed and writes a probe file into it: a read-only or impossible folder
    fails now, not after hours of work."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise ConfigError(f"config field `{field}`: folder {path!r} is not writable ({error.strerror or error})") from None


def config_dict(config) -> dict:
    """The config as written to config.json, the trackers and the model card: never the hub token."""
    values = dataclasses.asdict(config)
    if values.get("hub_token"):
        values["hub_token"] = "<redacted>"
    return values


# ----------------------------------------------------------------------------------------------
# Prompt data

PROMPT_COLUMN_NAMES = ("prompt", "caption", "text")  # the first one a source has is the prompt


def _require_utf8_lines(path: str):
    """A text file's bytes must be UTF-8: the error names the first bad line (datasets' text reader
    would only say that some byte somewhere does not decode)."""
    with open(path, "rb") as f:
        for line_number, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise InputError(f"{path}: line {line_number} is not UTF-8 text ({error.reason} at byte "
                                 f"{error.start})") from None


def _prompt_column(name: str, columns: list[str]) -> str:
    """The first of PROMPT_COLUMN_NAMES that `columns` holds; an error naming the source otherwise."""
    found = next((c for c in PROMPT_COLUMN_NAMES if c in columns), None)
    if found is None:
        raise InputError(f"{name}: missing column 'prompt' (has {columns})")
    return found


def load_prompts(path: str, need_ocr_target: bool = False, split: str = "train", max_rows: int = 0) -> list[dict]:
    """Rows {prompt, ground_truth, uid} through `datasets` (data_process/records.py): a
    data_process/qwenimage_ocr.py parquet, a .jsonl, a .txt with one prompt per line (blank lines
    skipped), a directory of such files, or a Hub dataset id (its `split`; column prompt, caption or
    text). Errors name the file (or `id[split]`) and row; with need_ocr_target, every prompt must
    carry a quoted OCR target. max_rows > 0 stops reading after that many prompts."""
    from data_process.records import column_names, is_hub_id, open_parts
    from rewards import ocr_target

    if not os.path.exists(path) and not is_hub_id(path):
        raise FileNotFoundError(f"prompt data {path!r} does not exist")
    rows = []
    for name, dataset in open_parts(path, split, extensions=(".parquet", ".jsonl", ".json", ".txt")):
        label = os.path.basename(name) if os.path.exists(name) else name
        if name.endswith(".txt"):  # one prompt per line; uid = file:line number
            _require_utf8_lines(name)
            for line_number, row in enumerate(dataset, 1):
                if row["text"].strip():
                    rows.append({"prompt": row["text"].strip(), "ground_truth": None, "uid": f"{label}:{line_number}"})
            continue
        columns = column_names(dataset)  # None when a streamed source does not say before its first row
        prompt_column = None
        for i, row in enumerate(dataset):
            if prompt_column is None:
                columns = columns or list(row)
                prompt_column = _prompt_column(name, columns)
            prompt = row[prompt_column]
            if not isinstance(prompt, str) or not prompt.strip():
                raise InputError(f"{name}: row {i}: empty or non-string prompt")
            rows.append({"prompt": prompt, "ground_truth": row.get("ground_truth"), "uid": f"{label}:{i}"})
            if max_rows and len(rows) >= max_rows:
                break
        if columns is not None:  # also a source without rows must have the column
            _prompt_column(name, columns)
    if not rows:
        raise InputError(f"{path}: no prompts")
    if need_ocr_target:
        for row in rows:
            target = ocr_target(row["prompt"])
            if target is None:
                raise InputError(f"{row['uid']}: prompt has no quoted text for the OCR reward: {row['prompt']!r}")
            row["ground_truth"] = row["ground_truth"] if row["ground_truth"] is not None else target
    return rows[:max_rows or None]


def prompts_for_step(rows: list[dict], step: int, prompts_per_step: int, rank: int, world_size: int,
                     seed: int) -> list[dict]:
    """This rank's prompts for a global step: an endless stream of per-epoch permutations (seeded by
    seed and epoch), cut into steps of prompts_per_step and then into equal per-rank slices. A pure
    function of the step: resuming needs nothing but the step number."""
    per_rank = prompts_per_step // world_size
    start = step * prompts_per_step + rank * per_rank
    out = []
    for position in range(start, start + per_rank):
        epoch, offset = divmod(position, len(rows))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(derived_seed("epoch_order", seed, epoch)))
        out.append(rows[int(order[offset])])
    return out


def derived_seed(stream: str, *parts: int) -> int:
    """A 63-bit seed for one named random stream at integer coordinates (seed, step, rank, ...):
    independent streams without stored RNG state. blake2b over the stream name and the parts, so
    neighbouring coordinates, different run seeds and different streams do not collide (beyond the
    ~n^2 / 2^64 chance of any 63-bit hash)."""
    key = ",".join([stream, *(str(int(part)) for part in parts)]).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def rollout_seeds(seed: int, step: int, rank: int, n: int) -> list[int]:
    """The online trainer's rollout seeds: sample j of this rank's step."""
    return [derived_seed("rollout", seed, step, rank, j) for j in range(n)]


def dpo_noise_seed(seed: int, step: int, rank: int, stream: int, update: int) -> int:
    """The seed of the shared noise and sigma of one DPO update."""
    return derived_seed("dpo_noise", seed, step, rank, stream, update)


# ----------------------------------------------------------------------------------------------
# Checkpoints: full (unsharded) state dicts through torch.distributed.checkpoint, which handles a
# plain module, DDP and FSDP2 alike; written to a temporary directory and renamed into place.

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def trainable_state(model, optimizer, also_frozen: tuple[str, ...] = ()):
    """(model state of trainable parameters, optimizer state), full tensors on CPU. Collective:
    every rank calls it. also_frozen: name fragments of frozen parameters saved too (the old-policy
    LoRA adapter, ".old.")."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options())
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


CHECKPOINT_FILES = ("trainable.safetensors", "optimizer.pt", "train_state.json")
# Config fields that define what the trained weights are: a resume that changes one of them would
# train (or load into) something else, so it is refused. Every other field (learning rate, max_steps,
# evaluation, logging, ...) may change on resume. Extend this tuple when a field changes what the
# weights mean (a field missing from an older checkpoint's config counts as its default).
WEIGHT_DEFINING_FIELDS = ("pretrained", "train_mode", "lora_rank", "lora_alpha", "lora_targets", "lora_init",
                          "objective", "eval_with_ema", "eval_ema_decay")
# ... and the online objective's own knobs (objectives.OBJECTIVES[name].knobs): they decide what the
# checkpoint holds (an old adapter or not, and how it moves) and what the update optimises.
LORA_ONLY_FIELDS = ("lora_rank", "lora_alpha", "lora_targets", "lora_init")


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
    tmp = tempfile.mkdtemp(prefix=f".checkpoint-{step}-", dir=output_dir)
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model_state.items()}, os.path.join(tmp, "trainable.safetensors"))
    torch.save({"optimizer": optim_state, "lr_scheduler": lr_scheduler.state_dict()}, os.path.join(tmp, "optimizer.pt"))
    if run_config is not None:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(run_config, f, indent=1)
    with open(os.path.join(tmp, "train_state.json"), "w") as f:
        json.dump({**train_state, "step": step}, f, indent=1)
    if extra_writer is not None:
        extra_writer(tmp)
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp, final)
    if limit:
        for old in list_checkpoints(output_dir)[:-limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


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
    skipped and reported), or None when there is none (reported); a path -> itself if complete."""
    if not spec:
        return None
    if spec == "latest":
        for path in reversed(list_checkpoints(output_dir)):
            problem = checkpoint_problem(path)
            if problem is None:
                return path
            report(f"resume_from_checkpoint latest: skipping {path}: {problem}")
        report(f"resume_from_checkpoint latest: no complete checkpoint in {output_dir!r}; starting a fresh run")
        return None
    problem = checkpoint_problem(spec)
    if problem:
        raise FileNotFoundError(f"resume_from_checkpoint: {spec!r} is not a complete checkpoint: {problem}")
    return spec


def config_changes(saved: dict, config) -> list[str]:
    """'field: old -> new' for each WEIGHT_DEFINING_FIELDS entry that differs between a checkpoint's
    saved config and this run's (LoRA fields only when both train LoRA)."""
    both_lora = "lora" in (saved.get("train_mode", "lora"), config.train_mode)
    names = [name for name in WEIGHT_DEFINING_FIELDS + objective_knobs(config)
             if both_lora or name not in LORA_ONLY_FIELDS]
    return [f"{name}: {old!r} -> {new!r}" for name, old, new in differing_fields(saved, config, names)]


def differing_fields(saved: dict, config, names) -> list[tuple]:
    """(name, saved value, this run's value) for each of `names` that config has and whose values
    differ. A field missing from `saved` (a config written before it existed) counts as its default;
    lora_targets compare as a set of modules (another order is the same adapter)."""
    defaults = {f.name: f.default for f in dataclasses.fields(config)}
    changes = []
    for name in names:
        if name not in defaults:
            continue
        old, new = saved.get(name, defaults[name]), getattr(config, name)
        if name == "lora_targets":
            same = sorted(str(old).split(",")) == sorted(str(new).split(","))
        else:
            same = old == new
        if not same:
            changes.append((name, old, new))
    return changes


def objective_knobs(config) -> tuple[str, ...]:
    """The knobs of the online trainer's objective (none for a config without `objective`)."""
    if not hasattr(config, "objective"):
        return ()
    from objectives import OBJECTIVES

    objective = OBJECTIVES.get(config.objective)
    return objective.knobs if objective else ()


def check_resume_config(checkpoint: str, config):
    """Refuses a resume whose weight-defining fields differ from the checkpoint's (before loading)."""
    file = os.path.join(checkpoint, "config.json")
    if not os.path.isfile(file):  # written by an older version: the strict load still checks names and shapes
        return
    with open(file) as f:
        saved = json.load(f)
    changes = config_changes(saved, config)
    if changes:
        raise InputError(f"resume_from_checkpoint: {checkpoint} was trained with other weight-defining settings "
                         f"({'; '.join(changes)}); resume with the checkpoint's values or start a new run in "
                         "another output_dir")


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
                   options=_options(strict=False))
    lr_scheduler.load_state_dict(saved["lr_scheduler"])
    return train_state


# ----------------------------------------------------------------------------------------------
# Logging


class MetricsLog:
    """metrics.jsonl (one object per logged step, rank 0) plus accelerate's trackers."""

    def __init__(self, accelerator, output_dir: str, resume_step: int | None = None):
        self.accelerator = accelerator
        self.path = os.path.join(output_dir, "metrics.jsonl")
        if accelerator.is_main_process and resume_step is not None and os.path.exists(self.path):
            # drop rows logged after the checkpoint we resume from (they will be logged again) and the
            # earlier leg's final row; a cut-off last line (a kill mid-write) is dropped, a damaged
            # line before it is an error naming it
            with open(self.path) as f:
                lines = f.readlines()
            kept = []
            for number, line in enumerate(lines, 1):
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    if number < len(lines):
                        raise InputError(f"{self.path}: line {number} is not a JSON object; repair or remove it") from None
                    accelerator.print(f"{self.path}: dropping its damaged last line {number}")
                    continue
                if row.get("step", 0) <= resume_step and not any(k.startswith("final/") for k in row):
                    kept.append(line)
            with open(self.path, "w") as f:
                f.writelines(kept)

    def log(self, metrics: dict, step: int):
        if self.accelerator.is_main_process:
            row = {"step": step, **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        # trackers get the numbers; lists (prompt ids, per-rank checksums) stay in metrics.jsonl
        self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def _tracker(self, name):
        if not self.accelerator.is_main_process or name not in [t.name for t in self.accelerator.trackers]:
            return None
        return self.accelerator.get_tracker(name, unwrap=True)  # the wandb run / the SummaryWriter

    def log_image(self, name: str, image: Image.Image, step: int, caption: str = ""):
        """A sample grid to the trackers: wandb.Image (wandb) / add_image (tensorboard)."""
        import numpy as np

        if (run := self._tracker("wandb")) is not None:
            import wandb

            run.log({name: wandb.Image(image, caption=caption or None)}, step=step)
        if (writer := self._tracker("tensorboard")) is not None:
            writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int):
        """Per-image results to the trackers: wandb.Table (PIL cells become images) / a markdown table
        as tensorboard text."""
        if (run := self._tracker("wandb")) is not None:
            import wandb

            data = [[wandb.Image(v) if isinstance(v, Image.Image) else v for v in row] for row in rows]
            run.log({name: wandb.Table(columns=columns, data=data)}, step=step)
        if (writer := self._tracker("tensorboard")) is not None:
            keep = [i for i, v in enumerate(rows[0]) if not isinstance(v, Image.Image) and v is not None] if rows else []
            lines = ["| " + " | ".join(columns[i] for i in keep) + " |", "|" + "---|" * len(keep)]
            lines += ["| " + " | ".join(f"{row[i]:.4f}" if isinstance(row[i], float) else str(row[i]) for i in keep) + " |"
                      for row in rows]
            writer.add_text(name, "\n".join(lines), step)


def setup_trackers(accelerator, log_with: str, project: str, config: dict, output_dir: str):
    """wandb runs offline when no API key is configured; tensorboard writes under output_dir."""
    if log_with == "none":
        return
    if log_with == "wandb" and not os.environ.get("WANDB_API_KEY") and "WANDB_MODE" not in os.environ:
        os.environ["WANDB_MODE"] = "offline"
        os.environ.setdefault("WANDB_DIR", output_dir)
    accelerator.init_trackers(project, config={k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))})


def pair_grid(chosen: list[Image.Image], rejected: list[Image.Image], chosen_rewards, rejected_rewards,
              tile: int = 128, labels=("W", "L")) -> Image.Image:
    """Two rows: chosen on top, rejected below, each tile captioned with its label and reward."""
    n = len(chosen)
    grid = Image.new("RGB", (tile * n, 2 * (tile + 14)), "white")
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        for row, (images, scores) in enumerate(((chosen, chosen_rewards), (rejected, rejected_rewards))):
            y = row * (tile + 14)
            grid.paste(images[i].convert("RGB").resize((tile, tile)), (i * tile, y + 14))
            draw.text((i * tile + 2, y + 1), f"{labels[row]} {float(scores[i]):.3f}", fill="black")
    return grid


def image_grid(images: list[Image.Image], captions: list[str], columns: int = 8, tile: int = 128) -> Image.Image:
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (tile * min(columns, len(images)), rows * (tile + 14)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, caption) in enumerate(zip(images, captions)):
        x, y = (i % columns) * tile, (i // columns) * (tile + 14)
        grid.paste(image.convert("RGB").resize((tile, tile)), (x, y + 14))
        draw.text((x + 2, y + 1), caption[:24], fill="black")
    return grid


def start_run(accelerator, config, resume_step: int | None) -> "MetricsLog":
    """Output directory, config.json, trackers and the metrics log."""
    metrics_log = MetricsLog(accelerator, config.output_dir, resume_step=resume_step)
    setup_trackers(accelerator, config.log_with, config.tracker_project, config_dict(config), config.output_dir)
    if accelerator.is_main_process:
        os.makedirs(os.path.join(config.output_dir, "samples"), exist_ok=True)
        with open(os.path.join(config.output_dir, "config.json"), "w") as f:
            json.dump(config_dict(config), f, indent=1)
    return metrics_log


def resume_and_start_run(config, policy, accelerator) -> tuple[int, "MetricsLog"]:
    """Restores `resume_from_checkpoint` if set; opens the run's logs. -> (start step, metrics log).
    `launch` has already resolved "latest" to a checkpoint path (or "") and compared its config."""
    start_step = 0
    checkpoint = resolve_checkpoint(config.resume_from_checkpoint, config.output_dir, report=accelerator.print)
    if checkpoint:
        start_step = policy.load_checkpoint(checkpoint)
        accelerator.print(f"resumed from {checkpoint} at step {start_step}")
    return start_step, start_run(accelerator, config, resume_step=start_step if checkpoint else None)


def after_step(steps_done: int, config, policy, accelerator, stop: "StopFlag", run_eval) -> bool:
    """Periodic evaluation and checkpoint. On a stop signal (agreed across ranks) a checkpoint is
    written and True returned: the caller leaves its loop."""
    if config.eval_every and steps_done % config.eval_every == 0:
        run_eval(steps_done)
    stopping = all_sum(accelerator, float(stop.raised))[0] > 0
    if stopping or (config.checkpoint_every and steps_done % config.checkpoint_every == 0):
        policy.save_checkpoint(config.output_dir, steps_done, config.checkpoints_total_limit)
    if stopping:
        accelerator.print(f"stop signal: checkpoint written at step {steps_done}, exiting")
        accelerator.end_training()
    return stopping


def finish(config, policy, metrics_log, accelerator) -> dict:
    """Final weights in the format diffusers loads; per-rank checksums show the replicas agree. LoRA:
    a model card next to the weights, the upload with push_to_hub, and a summary on the terminal."""
    metrics_log.log({"final/param_checksums": policy.checksums()}, config.max_steps)
    final_dir = policy.save_final(config.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if accelerator.is_main_process:
        evals = eval_history(config.output_dir)
        if config.train_mode == "lora":
            import model_card

            grids = sorted(f for f in os.listdir(os.path.join(config.output_dir, "samples")) if f.startswith("eval-"))
            model_card.write_model_card(final_dir, config_dict(config), evals,
                                        os.path.join(config.output_dir, "samples", grids[-1]) if grids else None,
                                        kind="offline" if hasattr(config, "pairs_path") else "online")
            if getattr(config, "push_to_hub", False):
                model_card.push_to_hub(final_dir, config.hub_model_id, config.hub_token or None)
        print(run_summary(config, final_dir, evals))
    return {"final_dir": final_dir, "step": config.max_steps}


def eval_history(output_dir: str) -> list[dict]:
    """The eval rows of output_dir/metrics.jsonl (all of them, also those logged before a resume)."""
    path = os.path.join(output_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [row for row in map(json.loads, f) if "eval/reward_mean" in row]


def run_summary(config, final_dir: str, evals: list[dict]) -> str:
    """The end-of-run report: eval before -> after (± standard error), steps, wall time, where things are."""
    import time

    lines = [f"done: {config.max_steps} steps in {time.perf_counter() - _RUN_START:.0f} s wall"]
    if evals:
        first, last = evals[0], evals[-1]
        lines.append(f"eval reward: {first['eval/reward_mean']:.4f} ± {first.get('eval/reward_se', 0):.2g} (step {first['step']})"
                     f" -> {last['eval/reward_mean']:.4f} ± {last.get('eval/reward_se', 0):.2g} (step {last['step']})")
        if "eval/exact_match" in last:
            lines.append(f"eval exact match: {first['eval/exact_match']:.3f} -> {last['eval/exact_match']:.3f}")
        if "eval/reward_gain" in last:
            lines.append(f"gain, paired image by image: {format_gain(last)}")
    lines += [f"weights:  {final_dir}" + ("  (model card: README.md)" if config.train_mode == "lora" else ""),
              f"metrics:  {os.path.join(config.output_dir, 'metrics.jsonl')}",
              f"samples:  {os.path.join(config.output_dir, 'samples')}"]
    if config.train_mode == "lora":
        load = (f"import qwen_image; pipe = qwen_image.load_pipeline(\"{config.pretrained}\")"
                if config.pretrained in ("tiny", "tiny-bench") else
                f"import torch; from diffusers import QwenImagePipeline; pipe = QwenImagePipeline.from_pretrained("
                f"\"{config.pretrained}\", torch_dtype=torch.bfloat16)")
        lines.append(f"load it:  python -c '{load}; pipe.load_lora_weights(\"{os.path.abspath(final_dir)}\")'")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Evaluation


def score_rows(reward_fn, images, rows) -> list[float]:
    return score_rows_with_components(reward_fn, images, rows)[0]


def score_rows_with_components(reward_fn, images, rows) -> tuple[list[float], dict[str, list[float]]]:
    """(combined reward per image, {component: scores} for a weighted multi-reward, else {})."""
    from rewards import score_components

    return score_components(reward_fn, images, [row["prompt"] for row in rows])


def component_metrics(accelerator, parts: dict[str, list[float]], prefix: str = "reward") -> dict:
    """{prefix}/{name}/mean|std|max|min of each reward component over every rank's images."""
    out = {}
    for name, scores in parts.items():
        values = torch.tensor(scores, dtype=torch.float64, device=accelerator.device)
        values = (accelerator.gather(values) if accelerator.num_processes > 1 else values).cpu()
        out.update({f"{prefix}/{name}/mean": values.mean().item(), f"{prefix}/{name}/std": values.std(unbiased=False).item(),
                    f"{prefix}/{name}/max": values.max().item(), f"{prefix}/{name}/min": values.min().item()})
    return out


@torch.no_grad()
def evaluate(pipe, prompt_cache, rows: list[dict], reward_fn, rollout_settings, samples_per_prompt: int,
             accelerator, exact_match: bool, components: dict | None = None) -> tuple[dict, list[Image.Image], list[float]]:
    """Fixed seeds (sample j of eval prompt i has seed i * 1000 + j) so every evaluation sees the same
    noise. Prompts are split across ranks (padded to equal length: every rank runs the same number
    of forwards, which sharded models require); rewards gathered. Returns (metrics, this rank's
    images, this rank's rewards); pass a dict as `components` to receive this rank's per-component
    scores of a weighted reward."""
    import qwen_image

    world, rank = accelerator.num_processes, accelerator.process_index
    jobs = [(i, j) for i in range(len(rows)) for j in range(samples_per_prompt)]
    per_rank = math.ceil(len(jobs) / world)
    mine = jobs[rank * per_rank:(rank + 1) * per_rank]
    n_real = len(mine)
    mine = mine + [jobs[-1]] * (per_rank - n_real)  # padding, dropped below
    prompts = [rows[i]["prompt"] for i, _ in mine]
    seeds = [i * 1000 + j for i, j in mine]
    _, images = qwen_image.rollout(pipe, prompt_cache, prompts, seeds, rollout_settings)
    scores, parts = score_rows_with_components(reward_fn, images[:n_real], [rows[i] for i, _ in mine[:n_real]]) \
        if n_real else ([], {})
    names = sorted(parts)
    # [per_rank, 1 + components]: the combined reward, then each component; NaN rows are padding
    table = torch.full((per_rank, 1 + len(names)), float("nan"), dtype=torch.float64)
    if n_real:
        table[:n_real] = torch.tensor([scores] + [parts[n] for n in names], dtype=torch.float64).T
    gathered = accelerator.gather(table.to(accelerator.device)).cpu()
    gathered = gathered[~torch.isnan(gathered[:, 0])]
    values = gathered[:, 0]
    metrics = {"eval/reward_mean": values.mean().item(), "eval/reward_std": values.std(unbiased=False).item(),
               "eval/reward_se": standard_error(values),
               "eval/images": float(values.numel()),
               "eval/rewards": values.tolist()}  # every image's reward, in (prompt, seed) order: paired gains
    for k, name in enumerate(names):
        metrics[f"eval/{name}/reward_mean"] = gathered[:, 1 + k].mean().item()
    if exact_match:
        exact = exact_matches(values)
        metrics["eval/exact_match"] = exact.mean().item()
        metrics["eval/exact_match_se"] = standard_error(exact)
    if components is not None:
        components.update(parts)
    return metrics, images[:n_real], scores


def exact_matches(rewards: torch.Tensor) -> torch.Tensor:
    """1.0 where the OCR reward is a full match (1.0, up to float rounding), else 0.0 (float64)."""
    return (rewards >= 1.0 - 1e-9).double()


def standard_error(values: torch.Tensor) -> float:
    """Standard error of the mean of `values` (sample std / sqrt(n)); 0 for fewer than 2 values."""
    return (values.std(unbiased=True) / math.sqrt(len(values))).item() if len(values) > 1 else 0.0


def paired_gain(rewards: list[float], baseline: list[float], exact_match: bool) -> dict:
    """The change of the eval from `baseline` (an earlier eval of the same prompts and seeds, image by
    image) with the standard error of the paired differences: every image keeps its prompt and noise,
    so the seed-to-seed spread cancels (on the text world the gain's SE is ~0.03 exact match where
    the two evals' own SEs combine to ~0.05)."""
    after, before = torch.tensor(rewards, dtype=torch.float64), torch.tensor(baseline, dtype=torch.float64)
    diff = after - before
    gain = {"eval/reward_gain": diff.mean().item(), "eval/reward_gain_se": standard_error(diff)}
    if exact_match:
        exact_diff = exact_matches(after) - exact_matches(before)
        gain.update({"eval/exact_match_gain": exact_diff.mean().item(), "eval/exact_match_gain_se": standard_error(exact_diff)})
    return gain


def format_eval(metrics: dict) -> str:
    """'reward 0.5049 ± 0.0002 (64 images)': the mean with its standard error (and the paired gain
    since the run's first eval, when there is one)."""
    text = f"reward {metrics['eval/reward_mean']:.4f} ± {metrics.get('eval/reward_se', 0.0):.2g} " \
           f"({int(metrics['eval/images'])} images)"
    extra = [f"{k.split('/')[1]} {v:.4f}" for k, v in metrics.items() if k.endswith("/reward_mean") and k.count("/") == 2]
    if "eval/exact_match" in metrics:
        extra.append(f"exact match {metrics['eval/exact_match']:.3f} ± {metrics.get('eval/exact_match_se', 0.0):.2g}")
    text += f" [{', '.join(extra)}]" if extra else ""
    return text + (f"; since the first eval (paired): {format_gain(metrics)}" if "eval/reward_gain" in metrics else "")


def format_gain(metrics: dict) -> str:
    """'reward +0.0816 ± 0.016, exact match +0.094 ± 0.03': paired_gain's figures."""
    gains = [f"reward {metrics['eval/reward_gain']:+.4f} ± {metrics['eval/reward_gain_se']:.2g}"]
    if "eval/exact_match_gain" in metrics:
        gains.append(f"exact match {metrics['eval/exact_match_gain']:+.3f} ± {metrics['eval/exact_match_gain_se']:.2g}")
    return ", ".join(gains)


def rollout_settings(config, num_inference_steps: int):
    """The trainers' sampling settings (both configs carry these fields)."""
    return qwen_image.RolloutSettings(height=config.height, width=config.width, num_inference_steps=num_inference_steps,
                                      true_cfg_scale=config.true_cfg_scale, negative_prompt=config.negative_prompt,
                                      chunk_size=config.rollout_chunk_size)


def make_eval(config, pipe, prompt_cache, eval_rows, reward_fn, accelerator, metrics_log):
    """-> run_eval(step): the eval prompts at fixed seeds with `eval_inference_steps`, logged with the
    paired gain over the run's first eval (read back from metrics.jsonl after a resume)."""
    from rewards import OCR_REWARDS

    settings = rollout_settings(config, config.eval_inference_steps)
    is_ocr = config.reward in OCR_REWARDS
    earlier = [row for row in eval_history(config.output_dir) if "eval/rewards" in row]
    first = {"rewards": earlier[0]["eval/rewards"] if earlier else None}

    def run_eval(step: int) -> dict:
        if step == 0 and config.eval_baseline:  # checked by check_eval_baseline: the same eval, already run
            metrics = {**baseline_eval(config.eval_baseline), "eval/taken_from": os.path.abspath(config.eval_baseline)}
            metrics_log.log(metrics, 0)
            accelerator.print(f"eval @ step 0: taken from {config.eval_baseline}: {format_eval(metrics)}")
        else:
            metrics = evaluate_and_log(pipe, prompt_cache, eval_rows, reward_fn, settings, config.eval_samples_per_prompt,
                                       accelerator, is_ocr, metrics_log, step, config.output_dir, baseline=first["rewards"])
        if first["rewards"] is None:
            first["rewards"] = metrics["eval/rewards"]
        return metrics
    return run_eval


TABLE_IMAGES = 64  # eval table rows that carry their image (the rest: numbers only)


def evaluate_and_log(pipe, prompt_cache, rows, reward_fn, rollout_settings, samples_per_prompt, accelerator,
                     exact_match: bool, metrics_log, step: int, output_dir: str, baseline: list | None = None) -> dict:
    """The trainers' periodic evaluation: metrics to the log and the terminal (with the paired gain
    over `baseline`, an earlier eval's per-image rewards), a grid to samples/eval-STEP.png and the
    trackers (with a table of this rank's images and rewards)."""
    import time

    start = time.perf_counter()
    pipe.transformer.eval()
    parts = {}
    metrics, images, scores = evaluate(pipe, prompt_cache, rows, reward_fn, rollout_settings, samples_per_prompt,
                                       accelerator, exact_match, components=parts)
    pipe.transformer.train()
    if baseline is not None and len(baseline) == len(metrics["eval/rewards"]):
        metrics.update(paired_gain(metrics["eval/rewards"], baseline, exact_match))
    metrics_log.log(metrics, step)
    if accelerator.is_main_process and images:
        grid = image_grid(images[:32], [f"{s:.3f}" for s in scores[:32]])
        grid.save(os.path.join(output_dir, "samples", f"eval-{step:06d}.png"))
        metrics_log.log_image("eval/grid", grid, step, caption=f"step {step}: {format_eval(metrics)}")
        jobs = [(i, j) for i in range(len(rows)) for j in range(samples_per_prompt)][:len(images)]
        names = sorted(parts)
        metrics_log.log_table("eval/samples", ["prompt", "seed", "reward", *names, "image"],
                              [[rows[i]["prompt"], i * 1000 + j, scores[k], *[parts[n][k] for n in names],
                                images[k] if k < TABLE_IMAGES else None]  # media stays small on big evals
                               for k, (i, j) in enumerate(jobs)], step)
    if accelerator.is_main_process:
        from tqdm.auto import tqdm

        tqdm.write(f"eval @ step {step}: {format_eval(metrics)} in {time.perf_counter() - start:.1f} s")  # above the bar
    return metrics


# ----------------------------------------------------------------------------------------------
# Stop signal


class StopFlag:
    """Set by SIGTERM/SIGINT; the loop checks it (agreed across ranks) at step boundaries, writes a
    checkpoint and exits cleanly. A second signal raises KeyboardInterrupt at once (e.g. to leave a
    hung reward call); `cli` turns it into one line and exit status 130. Checkpoints are written
    atomically, so what is already on disk stays loadable."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handler)

    def _handler(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now, without a checkpoint")
        self.raised = True
        print(f"{signal.Signals(signum).name}: stopping after this step with a checkpoint "
              "(send it again to stop at once)", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Launch


_RUN_START = 0.0  # set by launch: the summary's wall time


def launch(config, validate):
    """-> (accelerator, stop flag): the accelerator (with launch checks), `validate(config, world)`
    for the real number of processes, seeds set, SIGTERM/SIGINT caught."""
    from accelerate.utils import set_seed

    import time

    global _RUN_START
    _RUN_START = time.perf_counter()
    accelerator = make_accelerator(config)
    validate(config, accelerator.num_processes)
    prepare_output_dir(config, accelerator)
    set_seed(config.seed)
    return accelerator, StopFlag()


# What a training run writes into output_dir (tracker folders are added for --overwrite_output_dir).
RUN_ENTRIES = ("config.json", "metrics.jsonl", "lora", "transformer", "samples")


def run_entries(output_dir: str) -> list[str]:
    """The names in output_dir that belong to a training run (sorted; checkpoints by step)."""
    if not os.path.isdir(output_dir):
        return []
    names = [n for n in RUN_ENTRIES if os.path.exists(os.path.join(output_dir, n))]
    return names + [os.path.basename(p) for p in list_checkpoints(output_dir)]


def prepare_output_dir(config, accelerator):
    """Before any model loads. A fresh run refuses a folder that holds a run (naming what is there)
    unless `overwrite_output_dir` (its run files are deleted first); `resume_from_checkpoint latest`
    is resolved here to the newest complete checkpoint (or "" when there is none in a folder without
    a run); a resume whose weight-defining config differs from the checkpoint's is refused; orphaned
    .checkpoint-* folders (a kill mid-save) are removed."""
    output_dir = config.output_dir
    existing = run_entries(output_dir)
    if config.resume_from_checkpoint == "latest":
        checkpoint = resolve_checkpoint("latest", output_dir,
                                        report=accelerator.print if accelerator.is_main_process else lambda m: None)
        if checkpoint is None and existing:
            raise FileExistsError(f"resume_from_checkpoint latest: output_dir {output_dir!r} holds a run "
                                  f"({', '.join(existing)}) but no complete checkpoint to resume; pass "
                                  "--overwrite_output_dir true to replace it or choose another output_dir")
        # the run's config.json records which checkpoint it continued from
        config.resume_from_checkpoint = checkpoint or ""
    elif existing and not config.resume_from_checkpoint and not config.overwrite_output_dir:
        raise FileExistsError(f"output_dir {output_dir!r} already holds a run ({', '.join(existing)}): pass "
                              "--resume_from_checkpoint latest to continue it, --overwrite_output_dir true to "
                              "replace it, or choose another output_dir")
    if config.resume_from_checkpoint:
        check_resume_config(config.resume_from_checkpoint, config)
    accelerator.wait_for_everyone()  # every rank has looked before rank 0 changes anything
    if accelerator.is_main_process:
        if config.overwrite_output_dir and existing:
            accelerator.print(f"overwrite_output_dir: deleting {', '.join(existing)} in {output_dir}")
        for name in os.listdir(output_dir) if os.path.isdir(output_dir) else []:
            path = os.path.join(output_dir, name)
            orphan = name.startswith(".checkpoint-")
            old_run = config.overwrite_output_dir and (name in existing or name in ("wandb", config.tracker_project))
            if orphan or old_run:
                if orphan:
                    accelerator.print(f"removing {path}: an unfinished checkpoint (the run was killed while saving)")
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    accelerator.wait_for_everyone()


def make_accelerator(config):
    from accelerate import Accelerator

    accelerator = Accelerator(log_with=None if config.log_with == "none" else config.log_with,
                              project_dir=config.output_dir)
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise RuntimeError("launch with a MULTI_GPU accelerate config (configs/multi_gpu.yaml) and pass "
                           "--sharding fsdp2: the script shards the transformer itself (it samples with it too)")
    if int(os.environ.get("WORLD_SIZE", "1")) != accelerator.num_processes:
        raise RuntimeError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']} but accelerate set up "
                           f"{accelerator.num_processes} process(es): on CPU set ACCELERATE_USE_CPU=true")
    return accelerator


def all_sum(accelerator, *values) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()


def all_max(accelerator, value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t.item()


def gather_object(accelerator, obj) -> list:
    """[obj of rank 0, obj of rank 1, ...]"""
    if accelerator.num_processes == 1:
        return [obj]
    out = [None] * accelerator.num_processes
    torch.distributed.all_gather_object(out, obj)
    return out
