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

    generator = load_generator()
    text = generator.render()
    for module in (train_online_dpo, train_offline_dpo):
        section = text.split(f"## `{module.__name__}.py`")[1].split("\n## ")[0]
        comments = field_comments(module.Config)
        for field in dataclasses.fields(module.Config):
            row = next(line for line in section.splitlines() if line.startswith(f"| `--{field.name}` |"))
            assert f"| `{shown_value(field.default)}` |" in row and row.endswith(f"| {generator.cell(comments.get(field.name, ''))} |")
        for name, overrides in module.PRESETS.items():
            line = next(line for line in section.splitlines() if line.startswith(f"- `{name}`: "))
            assert all(f"--{key} {shown_value(value)}" in line for key, value in overrides.items())
    assert ROOT not in text  # project paths are written relative to the project: the file is the same everywhere


def github_anchors(markdown: str) -> set[str]:
    """The anchors GitHub gives the headings of a markdown text (duplicates get -1, -2, ...)."""
    import re

    anchors, seen, fenced = set(), {}, False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def test_every_relative_link_and_anchor_in_the_readme_and_docs_resolves():
    import glob
    import re

    pages = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
    broken = []
    for page in pages:
        text = open(page).read()
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            file = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(file):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such file)")
            elif anchor and file.endswith(".md") and anchor not in github_anchors(open(file).read()):
                broken.append(f"{os.path.relpath(page, ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
    assert "the-comparison-at-an-equal-rollout-budget-official-defaults" in github_anchors(
        "## The comparison at an equal rollout budget (official defaults)")
    assert github_anchors("# Flow-GRPO (`--objective grpo`)\n# A\n# A") == {"flow-grpo---objective-grpo", "a", "a-1"}


def test_configuration_md_covers_every_script_with_flags():
    import re

    generator = load_generator()
    scripts = []
    for folder in ("", "data_process", "benchmarks"):
        for name in sorted(os.listdir(os.path.join(ROOT, folder) if folder else ROOT)):
            path = os.path.join(ROOT, folder, name)
            if name.endswith(".py") and name != "run_config.py":
                source = open(path).read()
                if re.search(r"ArgumentParser\(|parse_config\(", source) and "def main" in source:
                    scripts.append(os.path.join(folder, name) if folder else name)
    covered = [script for script, _, _ in generator.SCRIPTS]
    assert sorted(scripts) == sorted(covered), set(scripts) ^ set(covered)
    text = generator.render()
    for script in covered:
        assert f"\n## `{script}`\n" in text, script
    # an argparse script's flags, as its parser has them
    plot_runs = text.split("## `benchmarks/plot_runs.py`")[1].split("\n## ")[0]
    assert "| `--grid_rows` | int | `0` | --grid: keep the first N rows of each grid (0 = all) |" in plot_runs
    assert "| `run_dirs` (positional) | list of str | required |" in plot_runs


def test_the_stopped_line_the_docs_quote_is_the_one_the_trainer_prints():
    import re
    import types

    import policy

    # the guard that stops a run after max_degenerate_steps_in_a_row steps that trained nothing
    state = types.SimpleNamespace(config=types.SimpleNamespace(max_nonfinite_in_a_row=3, max_degenerate_steps_in_a_row=10),
                                  step_nonfinite=False, nonfinite_in_a_row=0, degenerate_in_a_row=10)
    with __import__("pytest").raises(policy.TrainingStopped) as stopped:
        policy.Policy.stop_if_degenerate(state, 12)
    trainer = open(os.path.join(ROOT, "train_online_dpo.py")).read()
    assert 'print(f"{os.path.basename(sys.argv[0])}: stopped: {error}", file=sys.stderr)' in trainer
    assert "sys.exit(3)" in trainer
    training = open(os.path.join(ROOT, "docs", "training.md")).read()
    assert f"\n    train_online_dpo.py: stopped: {stopped.value}\n" in training
    readme = open(os.path.join(ROOT, "README.md")).read()
    quoted = re.search(r"`(train_online_dpo\.py: stopped: [^`]*)`", readme).group(1)
    pattern = re.escape(quoted).replace(r"\.\.\.", ".*").replace("N", r"\d+")
    assert re.fullmatch(pattern, f"train_online_dpo.py: stopped: {stopped.value}"), quoted
