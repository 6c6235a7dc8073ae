"""Exit status 0 when every requirement of a requirements file is installed at an allowed version,
1 otherwise (a missing package, a version outside its specifier, a line that does not parse): the
Makefile runs pip, which takes a minute to say that all is there, only on 1.

    python requirements_met.py                   # requirements.txt
    python requirements_met.py other.txt         # prints what is missing, one line each

Comments and blank lines are skipped; each line is stripped before packaging parses it (packaging
26 refuses a requirement that keeps its newline).
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version


def unmet(path: str) -> list[str]:
    """What pip would have to install: one line per requirement not met."""
    from packaging.requirements import InvalidRequirement, Requirement

    problems = []
    with open(path) as f:
        for line in f:
            text = line.split(" #", 1)[0].strip()
            if not text or text.startswith("#"):
                continue
            try:
                requirement = Requirement(text)
            except InvalidRequirement as error:
                problems.append(f"{text}: {error}")
                continue
            if requirement.marker is not None and not requirement.marker.evaluate():
                continue  # not for this platform / Python
            try:
                installed = version(requirement.name)
            except PackageNotFoundError:
                problems.append(f"{requirement.name}: not installed")
                continue
            if not requirement.specifier.contains(installed, prereleases=True):
                problems.append(f"{requirement.name}: {installed} installed, {requirement.specifier} required")
    return problems


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        problems = unmet(argv[0] if argv else "requirements.txt")
    except ImportError:  # no packaging yet: pip installs it with the rest
        return 1
    for problem in problems:
        print(f"requirements: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
