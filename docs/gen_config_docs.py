"""Writes docs/configuration.md: every flag of every script. The scripts with a Config dataclass:
its fields (flag, type, default, help) and its presets with their overrides, read from the dataclass
and its trailing `# comment` help texts, the same sources as the script's --help
(run_config.build_parser). The scripts with an argparse parser (data_process/ converters,
benchmarks/): the parser their main builds, captured when it parses (nothing else of main runs).

    python docs/gen_config_docs.py          # rewrites docs/configuration.md
    python docs/gen_config_docs.py --check  # exit status 1 when the file is stale (tests/test_docs.py)

Importing the scripts is cheap for most: they import their heavy libraries inside functions.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "docs", "configuration.md")
REGENERATE = "python docs/gen_config_docs.py"
# (script, its config dataclass or None for an argparse script, its presets or None); the order of
# the document. tests/test_docs.py checks that every script with flags is here.
SCRIPTS = (
    ("train_online_dpo.py", "Config", "PRESETS"),
    ("train_offline_dpo.py", "Config", "PRESETS"),
    ("evaluate.py", "EvalConfig", "PRESETS"),
    ("generate.py", "GenerateConfig", None),
    ("export_checkpoint.py", "ExportConfig", None),
    ("data_process/make_offline_pairs.py", "PairsConfig", "PRESETS"),
    ("data_process/pickapic_to_pairs.py", None, None),
    ("data_process/qwenimage_ocr.py", None, None),
    ("build_text_world.py", "BuildConfig", None),
    ("benchmarks/plan.py", None, None),
    ("benchmarks/gpu_check.py", None, None),
    ("benchmarks/compare_objectives.py", None, None),
    ("benchmarks/compare_offline.py", None, None),
    ("benchmarks/plot_runs.py", None, None),
    ("benchmarks/profile_world.py", None, None),
    ("benchmarks/bench_dpo_step.py", None, None),
    ("benchmarks/bench_padding.py", None, None),
    ("benchmarks/bench_reward.py", None, None),
    ("benchmarks/bench_reward_overlap.py", None, None),
    ("benchmarks/bench_rollout.py", None, None),
    ("benchmarks/bench_rollout_levers.py", None, None),
)


def import_script(script: str):
    """The script as a module (data_process.make_offline_pairs, benchmarks.plot_runs), its own folder
    on sys.path while it imports (benchmarks import their neighbours by bare name)."""
    folder = os.path.join(ROOT, os.path.dirname(script))
    sys.path.insert(0, folder)
    try:
        return importlib.import_module(script[:-3].replace("/", "."))
    finally:
        sys.path.remove(folder)


class _Captured(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


def captured_parser(module) -> argparse.ArgumentParser:
    """The ArgumentParser the script's main() builds, taken when main asks it to parse (parsing raises
    here, so nothing after it runs); sys.argv is the bare script name meanwhile."""
    saved_parse, saved_argv = argparse.ArgumentParser.parse_known_args, sys.argv

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_known_args = capture
    sys.argv = [module.__file__]
    try:
        module.main()
    except _Captured as captured:
        return captured.parser
    finally:
        argparse.ArgumentParser.parse_known_args, sys.argv = saved_parse, saved_argv
    raise RuntimeError(f"{module.__name__}.main() parsed no arguments")


def cell(text: str) -> str:
    """A markdown table cell: pipes escaped, no line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def code(text: str) -> str:
    return f"`{text}`" if text else ""


def section_head(script: str, module) -> list[str]:
    summary = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    return [f"## `{script}`", "", summary, "", f"`python {script} --help` shows the same; every field is a flag.", "",
            "| flag | type | default | help |", "| --- | --- | --- | --- |"]


def script_section(script: str, config_name: str | None, presets_name: str | None) -> list[str]:
    from run_config import field_comments, shown_value

    module = import_script(script)
    if config_name is None:
        return argparse_section(script, module)
    config_cls = getattr(module, config_name)
    presets = getattr(module, presets_name) if presets_name else {}
    comments = field_comments(config_cls)
    lines = section_head(script, module)
    for field in dataclasses.fields(config_cls):
        type_name = getattr(field.type, "__name__", str(field.type))
        default = shown_value(field.default)
        lines.append(f"| `--{field.name}` | {type_name} | {cell(code(default))} | {cell(comments.get(field.name, ''))} |")
    if presets:
        lines += ["", "Presets (`--preset NAME` applies these overrides first; explicit flags win):", ""]
        for name, overrides in presets.items():
            flags = " ".join(f"--{key} {shown_value(value)}" for key, value in overrides.items())
            lines.append(f"- `{name}`: `{flags}`")
    return lines + [""]


def argparse_rows(parser: argparse.ArgumentParser) -> list[tuple[str, str, str, str]]:
    """(flags, type, default, help) of each argument but --help, as --help words them."""
    from run_config import shown_value

    formatter = parser._get_formatter()
    rows = []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        flags = ", ".join(f"`{flag}`" for flag in action.option_strings) or f"`{action.dest}` (positional)"
        if action.nargs == 0:
            type_name = "flag"
        else:
            type_name = getattr(action.type, "__name__", "str") if action.type else "str"
            if action.nargs in ("*", "+"):
                type_name = f"list of {type_name}"
        if action.choices:
            type_name += " (" + ", ".join(str(choice) for choice in action.choices) + ")"
        if action.required:
            default = "required"
        elif action.default is None or action.default is argparse.SUPPRESS:
            default = ""
        else:
            default = code(shown_value(action.default))
        help_text = formatter._expand_help(action) if action.help else ""
        rows.append((flags, type_name, default, help_text))
    return rows


def argparse_section(script: str, module) -> list[str]:
    lines = section_head(script, module)
    lines[4] = f"`python {script} --help` shows the same (an argparse script)."
    for flags, type_name, default, help_text in argparse_rows(captured_parser(module)):
        lines.append(f"| {flags} | {cell(type_name)} | {cell(default)} | {cell(help_text)} |")
    return lines + [""]


def render() -> str:
    """The whole of docs/configuration.md."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    lines = ["# Configuration", "",
             f"Every flag of every script, generated by `{REGENERATE}` from the scripts' Config dataclasses",
             "(help texts: the fields' trailing `# comment`s) and, for the argparse scripts, from the parsers",
             "their main builds; do not edit by hand. tests/test_docs.py fails when this file is stale or a script",
             "with flags is missing.", ""]
    for script in SCRIPTS:
        lines += script_section(*script)
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    text = render()
    if "--check" in argv:
        with open(OUTPUT) as f:
            stale = f.read() != text
        if stale:
            print(f"{os.path.relpath(OUTPUT, ROOT)} is stale: run `{REGENERATE}`", file=sys.stderr)
        return 1 if stale else 0
    with open(OUTPUT, "w") as f:
        f.write(text)
    print(f"wrote {os.path.relpath(OUTPUT, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
