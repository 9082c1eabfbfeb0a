"""`make` runs this after installing from the lock: every requirement in pyproject.toml (runtime
and dev) is installed at a version it accepts. `pip check` alone misses the dev extra, so a
dependency added to pyproject without `make lock` would only show up as an ImportError somewhere
in the suite.
"""

from __future__ import annotations

import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from packaging.requirements import Requirement


def problems(pyproject: Path) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    found = []
    for text in [*project["dependencies"], *project["optional-dependencies"]["dev"]]:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = version(requirement.name)
        except PackageNotFoundError:
            found.append(f"{requirement} is not installed")
            continue
        if not requirement.specifier.contains(installed, prereleases=True):
            found.append(f"{requirement}: {installed} is installed")
    return found


if __name__ == "__main__":
    found = problems(Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml"))
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    if found:
        print(
            "error: the lock files do not match pyproject.toml: run 'make lock' and commit "
            "requirements*.lock",
            file=sys.stderr,
        )
        sys.exit(1)
