"""Print the requirements of kubetune with the given extras, one a line, from pyproject.toml.

The image builds install these (pinned by constraints.txt) in a layer of their own, before the sources are
copied in, so a code change rebuilds only the small layer that installs kubetune itself. The standard
library alone: it runs in a bare base image, before any package is installed.

    python3 scripts/requirements.py pyproject.toml trainer > requirements.txt
"""

from __future__ import annotations

import sys
import tomllib


def requirements(pyproject: str, extras: list[str]) -> list[str]:
    with open(pyproject, "rb") as file:
        project = tomllib.load(file)["project"]
    found = list(project["dependencies"])
    for extra in extras:
        found += project["optional-dependencies"][extra]
    return list(dict.fromkeys(found))


if __name__ == "__main__":
    print("\n".join(requirements(sys.argv[1], sys.argv[2:])))
