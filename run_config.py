"""A script's Config on the command line: every dataclass field is a flag whose --help is its trailing
`# comment`, presets apply first, explicit flags win; errors name the field and exit with status 2
(`cli`). Also the small validation helpers every script uses and the presets the scripts share.
Imports nothing from this project but qwen_image (cheap: it imports diffusers inside its functions).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import sys
import tempfile

import qwen_image
from qwen_image import looks_like_local_path  # (Qwen-Image loading refuses a missing local path too)

# Presets the scripts share (each script's PRESETS builds on these).
ROOT = os.path.dirname(os.path.abspath(__file__))
TINY_PROMPTS = os.path.join(ROOT, "data", "tiny_prompts.txt")
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


class WriteError(OSError):
    """A file the run cannot do without (a checkpoint) could not be written: `cli` prints its
    one-line message (naming the file and the OS error) and exits with status 2."""


def describe_os_error(error: OSError) -> str:
    """'the disk is full (errno 28 ENOSPC)' / 'Permission denied (errno 13 EACCES)': what the OS said."""
    import errno

    if error.errno == errno.ENOSPC:
        return "the disk is full (errno 28 ENOSPC)"
    if error.errno is None:
        return str(error)
    return f"{error.strerror or error} (errno {error.errno} {errno.errorcode.get(error.errno, '?')})"


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
        elif token.type == tokenize.NL and all(t.type in (tokenize.NL, tokenize.COMMENT) for t in line_tokens):
            line_tokens = []  # a blank or comment-only line (a section title) ends: nothing carries over
        elif token.type != tokenize.COMMENT or line_tokens:  # comment-only lines are section titles
            line_tokens.append(token)
    return comments


def shown_value(value) -> str:
    """A default or preset value as --help and docs/configuration.md show it: paths inside the
    project relative to its root (the same on every machine), a blank string in quotes ("", " ")."""
    if isinstance(value, str) and value.startswith(ROOT + os.sep):
        return os.path.relpath(value, ROOT)
    return f'"{value}"' if isinstance(value, str) and not value.strip() else str(value)


def _describe_presets(presets: dict[str, dict]) -> str:
    if not presets:
        return ""
    lines = ["presets (--preset NAME applies these overrides first; explicit flags win):"]
    for name, overrides in presets.items():
        lines.append(f"  {name}: " + " ".join(f"--{k} {shown_value(v)}" for k, v in overrides.items()))
    return "\n".join(lines)


def build_parser(config_cls, presets: dict[str, dict], description: str | None = None):
    """HfArgumentParser with each field's source comment as its help, the defaults and the presets.
    One flag per field, spelled as the field (HfArgumentParser also adds a dashed alias, --learning-rate,
    for every underscored name: dropped, so --help lists each flag once); the value's type as its
    metavar; a short usage line (the fields follow)."""
    import argparse

    from transformers import HfArgumentParser

    comments = field_comments(config_cls)
    types = {f.name: getattr(f.type, "__name__", str(f.type)) for f in dataclasses.fields(config_cls)}

    class Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        def _get_help_string(self, action):
            if isinstance(action, argparse._StoreFalseAction):  # --no_X: its own default would read as X's
                return action.help
            if action.dest in types:  # every field: its default as shown_value writes it
                return f"{action.help} (default: {shown_value(action.default)})".lstrip().replace("%", "%%")
            return super()._get_help_string(action)

    parser = HfArgumentParser(config_cls, description=description, epilog=_describe_presets(presets),
                              formatter_class=Formatter, usage="%(prog)s [--preset NAME] [--FIELD VALUE ...]")
    for option in [option for option in parser._option_string_actions if option.startswith("--") and "-" in option[2:]]:
        action = parser._option_string_actions.pop(option)
        action.option_strings.remove(option)
    for action in parser._actions:
        name = action.dest
        if name not in types:
            continue
        if isinstance(action, argparse._StoreFalseAction):  # HfArgumentParser's --no_X of a bool defaulting to true
            action.help = f"the same as --{name} false"
            continue
        action.metavar = types[name].upper()
        action.help = comments.get(name, "")
        if name == "preset":
            action.help = f"a named group of overrides, applied first: {', '.join(presets) or 'none'} (listed below)"
    return parser


LAST_ARGV: list[str] = []  # the flags parse_config last read (run_lifecycle.resume_command)


def parse_config(config_cls, presets: dict[str, dict], argv: list[str] | None = None, defaults: dict | None = None,
                 description: str | None = None):
    """Every dataclass field is a CLI flag (transformers' HfArgumentParser). `defaults` (e.g. read from
    a run's config.json) apply first, then `--preset NAME`'s overrides; flags given explicitly win.
    Unknown flags (with the closest field suggested) and unparsable values raise ConfigError."""
    import difflib

    argv = list(sys.argv[1:] if argv is None else argv)
    global LAST_ARGV
    LAST_ARGV = list(argv)  # the run's flags as given: the resume command a clean stop prints
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
    preset = flag_value(argv, "preset")
    if preset:
        if preset not in presets:
            raise ConfigError(f"config field `preset`: unknown preset {preset!r}; known: {', '.join(presets) or 'none'}")
        parser.set_defaults(**presets[preset])
    (config,) = parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    return config


def cli(main, argv=None, input_errors: tuple = ()):
    """The scripts' entry point: a config error, bad input (InputError, or a script's own
    `input_errors`), a refused run folder, a checkpoint that could not be written (WriteError) or a
    full disk anywhere (errno ENOSPC) prints one line to stderr and exits with status 2 (no
    traceback)."""
    try:
        result = main(argv)
        if argv is None:  # the script is leaving after a clean end (or a clean stop): a late Ctrl-C must not
            for sig in (signal.SIGINT, signal.SIGTERM):  # turn it into status 130 (the run restored the handlers)
                signal.signal(sig, signal.SIG_IGN)
        return result
    except (InputError, FileExistsError, WriteError, *input_errors) as error:
        print(f"{os.path.basename(sys.argv[0])}: {error}", file=sys.stderr)
        sys.exit(2)
    except OSError as error:
        import errno

        if error.errno != errno.ENOSPC:
            raise
        # a full disk anywhere in a run (metrics.jsonl, the final weights, a dataset cache): one line
        where = f" writing {error.filename}" if error.filename else ""
        print(f"{os.path.basename(sys.argv[0])}: {describe_os_error(error)}{where}: free some space (or choose "
              "another output_dir) and resume with --resume_from_checkpoint latest", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as error:  # a second Ctrl-C / SIGTERM (StopFlag) or Ctrl-C before training
        print(f"{os.path.basename(sys.argv[0])}: interrupted{f' ({error})' if str(error) else ''}", file=sys.stderr)
        sys.exit(130)


def flag_value(argv, name):
    """The value of `--name VALUE` or `--name=VALUE` in argv (before parsing: presets, --run_dir), or None."""
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


def require_writable_dir(path: str, field: str, create: bool = True):
    """Writes a probe file into `path` (created first when `create`; else into the nearest folder
    that exists, so that a run refused later leaves no empty folder behind): a read-only or
    impossible folder fails now, not after hours of work."""
    try:
        if create:
            os.makedirs(path, exist_ok=True)
        probe = path
        while not create and not os.path.exists(probe) and os.path.dirname(os.path.abspath(probe)) != os.path.abspath(probe):
            probe = os.path.dirname(os.path.abspath(probe))
        if not os.path.isdir(probe):
            raise NotADirectoryError(20, "Not a directory", probe)
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        raise ConfigError(f"config field `{field}`: folder {path!r} is not writable ({error.strerror or error})") from None


def data_source_exists(spec: str) -> bool:
    """A local path that exists, or a Hub dataset id (`owner/name`; read through `datasets`)."""
    from records import source_exists

    return source_exists(spec)


def require_data_source(spec: str, field: str):
    """A data flag names something readable: records.source_problem's reason otherwise."""
    from records import source_problem

    problem = source_problem(spec)
    require(problem is None, field, problem or "")


def require_pretrained(spec: str, field: str = "pretrained"):
    """`pretrained` before anything loads: "tiny" / "tiny-bench", a folder that save_pretrained wrote
    (it holds model_index.json), or a Hub model id (offline: only when the Hub cache has it)."""
    from records import hub_offline

    if spec in ("tiny", "tiny-bench"):
        return
    if os.path.isdir(spec):
        require(os.path.isfile(os.path.join(spec, "model_index.json")), field,
                f"folder {spec!r} has no model_index.json: not a diffusers pipeline folder (save_pretrained writes one)")
        return
    require(not os.path.exists(spec), field, f"{spec!r} is a file; a diffusers pipeline folder or a Hub model id is expected")
    require_local_path_exists(spec, field)
    hub_shaped = bool(re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", spec)) and not spec.startswith(".")
    require(hub_shaped, field, f"{spec!r} does not exist")
    if hub_offline():
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(spec, "model_index.json")
        require(isinstance(cached, str), field, f"{spec!r} does not exist as a local folder, and the Hub cache has no "
                                                "copy of it to use offline (HF_HUB_OFFLINE is set)")


def transformer_config(pretrained: str) -> dict | None:
    """The transformer's config without loading any weight: "tiny" / "tiny-bench" as
    qwen_image.build_tiny_pipeline builds them, a local folder's transformer/config.json, a Hub id's
    cached transformer/config.json (Qwen/Qwen-Image: its published dims even when not cached); None
    when unknown (another Hub model not in the cache)."""
    if pretrained in ("tiny", "tiny-bench"):
        return qwen_image.tiny_transformer_config("tiny" if pretrained == "tiny" else "bench")
    path = os.path.join(pretrained, "transformer", "config.json")
    if not os.path.isdir(pretrained):
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(pretrained, "transformer/config.json")
        except Exception:  # not a Hub-shaped id: nothing cached
            cached = None
        if not isinstance(cached, str):
            return dict(qwen_image.QWEN_IMAGE_TRANSFORMER_CONFIG) if pretrained == "Qwen/Qwen-Image" else None
        path = cached
    try:
        with open(path) as f:
            return {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    except (OSError, ValueError):
        return None


_LINEAR_SHAPES: dict[str, dict] = {}


def transformer_linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """{module name: (in_features, out_features)} of every Linear of the transformer `config`
    describes, built on the meta device (shapes only: no memory; ~1 s for the 20B model, cached)."""
    key = json.dumps(config, sort_keys=True)
    if key not in _LINEAR_SHAPES:
        import torch
        from diffusers import QwenImageTransformer2DModel

        with torch.device("meta"):
            model = QwenImageTransformer2DModel.from_config(config)
        _LINEAR_SHAPES[key] = qwen_image.linear_shapes(model)
    return _LINEAR_SHAPES[key]


def known_linear_shapes(pretrained: str) -> dict[str, tuple[int, int]] | None:
    """transformer_linear_shapes of `pretrained` read from its config, or None when its config is
    unknown or does not build a Qwen-Image transformer (the model's own loading then says why)."""
    config = transformer_config(pretrained)
    if config is None:
        return None
    try:
        return transformer_linear_shapes(config)
    except Exception:  # a config of another architecture, or of another diffusers version
        return None


def lora_parameter_count(linear_shapes: dict, targets, rank: int) -> int:
    """rank x (in + out) for each Linear a target names (peft's rule: the whole name or its dotted
    suffix); an upper bound of what qwen_image.add_lora adds (it may leave dead modules out)."""
    targets = [t.strip() for t in targets if t.strip()]
    return sum(rank * (shape[0] + shape[1]) for name, shape in linear_shapes.items()
               if any(name == t or name.endswith("." + t) for t in targets))


BYTES_PER_LORA_PARAM = 16  # fp32 weight, its gradient and AdamW's two moments


def available_memory_bytes() -> int:
    """The host memory a new allocation can get now: /proc/meminfo's MemAvailable (free pages plus
    reclaimable cache); elsewhere the free pages (sysconf)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def require_lora_fits_memory(pretrained: str, lora_targets: str, lora_rank: int, available: int | None = None):
    """`lora_rank`: the LoRA (weights, gradients, AdamW states: 16 bytes a parameter) fits the memory
    available now, counted from the transformer's config before anything is allocated (a rank of 1e9
    would otherwise try to allocate hundreds of GB). Unknown models pass (nothing to count from)."""
    shapes = known_linear_shapes(pretrained)
    if shapes is None:
        return
    count = lora_parameter_count(shapes, lora_targets.split(","), lora_rank)
    needed = count * BYTES_PER_LORA_PARAM
    available = available_memory_bytes() if available is None else available
    require(needed <= available, "lora_rank",
            f"rank {lora_rank} gives {count:,} LoRA parameters, which need {needed / 1e9:.1f} GB (fp32 weights, "
            f"gradients and AdamW states); {available / 1e9:.1f} GB of memory is available")


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


def config_dict(config) -> dict:
    """The config as written to config.json, the trackers and the model card: never the hub token."""
    values = dataclasses.asdict(config)
    if values.get("hub_token"):
        values["hub_token"] = "<redacted>"
    return values


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


def closest_path(spec: str) -> str | None:
    """The existing entry of spec's folder whose name is closest to spec's last component (difflib), or None."""
    import difflib

    parent, name = os.path.split(spec.rstrip("/"))
    try:
        names = os.listdir(os.path.expanduser(parent) or ".")
    except OSError:
        return None
    close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
    return os.path.join(parent, close[0]) if close else None


def require_local_path_exists(spec: str, field: str = "pretrained"):
    """A model path that is meant to be local (looks_like_local_path) exists, before any model loads:
    a typo of a local folder is one line naming the field (with the closest existing name), not a
    Hub download that fails after many seconds."""
    if os.path.exists(spec) or not looks_like_local_path(spec):
        return
    close = closest_path(spec)
    require(False, field, f"{spec!r} does not exist (a local path, not a Hub id)"
            + (f"; did you mean {close!r}?" if close else ""))
