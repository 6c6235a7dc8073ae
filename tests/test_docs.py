"""docs/configuration.md is generated from the scripts' Config dataclasses (docs/gen_config_docs.py):
this fails when a field, default, help comment or preset changed without regenerating it."""

import dataclasses
import importlib.util
import os

from conftest import ROOT


def load_generator():
    spec = importlib.util.spec_from_file_location("gen_config_docs", os.path.join(ROOT, "docs", "gen_config_docs.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_md_is_up_to_date():
    generator = load_generator()
    with open(generator.OUTPUT) as f:
        on_disk = f.read()
    assert on_disk == generator.render(), f"docs/configuration.md is stale: run `{generator.REGENERATE}`"


def test_configuration_md_lists_every_field_with_its_default_and_help_and_every_preset():
    import train_offline_dpo
    import train_online_dpo
    from run_config import field_comments, shown_value

    text = load_generator().render()
    for module in (train_online_dpo, train_offline_dpo):
        section = text.split(f"## `{module.__name__}.py`")[1].split("\n## ")[0]
        comments = field_comments(module.Config)
        for field in dataclasses.fields(module.Config):
            row = next(line for line in section.splitlines() if line.startswith(f"| `--{field.name}` |"))
            assert f"| `{shown_value(field.default)}` |" in row and row.endswith(f"| {comments.get(field.name, '')} |")
        for name, overrides in module.PRESETS.items():
            line = next(line for line in section.splitlines() if line.startswith(f"- `{name}`: "))
            assert all(f"--{key} {shown_value(value)}" in line for key, value in overrides.items())
    assert ROOT not in text  # project paths are written relative to the project: the file is the same everywhere
