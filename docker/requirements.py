"""Print the requirements of cadence extras, read from pyproject.toml, one per line.

The images install these in a layer of their own, before the source is copied, so editing code does
not reinstall torch. `cadence[...]` self-references are expanded; `torch` is left out (the Dockerfiles
install the CPU or CUDA build first, from the index that serves it).
Usage: python3 requirements.py pyproject.toml reward data
"""

from __future__ import annotations

import re
import sys
import tomllib


def requirements(project: dict, extras: list[str]) -> list[str]:
    """Core dependencies plus every requirement of `extras`, self-references expanded, torch dropped."""
    optional = project["optional-dependencies"]
    found: list[str] = list(project["dependencies"])
    pending, seen = list(extras), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        if extra not in optional:
            raise SystemExit(f"pyproject.toml defines no extra {extra!r}; known: {', '.join(sorted(optional))}")
        seen.add(extra)
        for requirement in optional[extra]:
            nested = re.fullmatch(r"cadence\[([\w,-]+)\]", requirement.replace(" ", ""))
            if nested:
                pending.extend(nested.group(1).split(","))
            else:
                found.append(requirement)
    return sorted({r for r in found if not re.match(r"torch\b(?![\w-])", r)})


def main() -> None:
    with open(sys.argv[1], "rb") as handle:
        project = tomllib.load(handle)["project"]
    print("\n".join(requirements(project, sys.argv[2:])))


if __name__ == "__main__":
    main()
