"""Writes docs/configuration.md: every script's Config fields (flag, type, default, help) and its
presets with their overrides, read from the dataclasses and their trailing `# comment` help texts,
the same sources as each script's --help (run_config.build_parser).

    python docs/gen_config_docs.py          # rewrites docs/configuration.md
    python docs/gen_config_docs.py --check  # exit status 1 when the file is stale (tests/test_docs.py)

Importing the scripts is cheap: they import their heavy libraries inside functions.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUTPUT = os.path.join(ROOT, "docs", "configuration.md")
REGENERATE = "python docs/gen_config_docs.py"
# (script, module, its config dataclass, its presets or None); the order of the document
SCRIPTS = (
    ("train_online_dpo.py", "train_online_dpo", "Config", "PRESETS"),
    ("train_offline_dpo.py", "train_offline_dpo", "Config", "PRESETS"),
    ("evaluate.py", "evaluate", "EvalConfig", "PRESETS"),
    ("data_process/make_offline_pairs.py", "data_process.make_offline_pairs", "PairsConfig", "PRESETS"),
    ("build_text_world.py", "build_text_world", "BuildConfig", None),
)


def cell(text: str) -> str:
    """A markdown table cell: pipes escaped, no line breaks."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def code(text: str) -> str:
    return f"`{text}`" if text else ""


def script_section(script: str, module_name: str, config_name: str, presets_name: str | None) -> list[str]:
    from run_config import field_comments, shown_value

    module = importlib.import_module(module_name)
    config_cls = getattr(module, config_name)
    presets = getattr(module, presets_name) if presets_name else {}
    comments = field_comments(config_cls)
    summary = (module.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    lines = [f"## `{script}`", "", summary, "", f"`python {script} --help` shows the same; every field is a flag.", "",
             "| flag | type | default | help |", "| --- | --- | --- | --- |"]
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


def render() -> str:
    """The whole of docs/configuration.md."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    lines = ["# Configuration", "",
             f"Generated from the scripts' Config dataclasses by `{REGENERATE}`; do not edit by hand (the help",
             "texts are the fields' trailing `# comment`s in the scripts). tests/test_docs.py fails when this file",
             "is stale.", ""]
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
