"""Print pyproject.toml's requirements, one per line, for `pip install -r`.

The image installs its dependencies from pyproject.toml alone, before any source is copied, so
that the big layer (torch, Ray, MLflow: ~7 GB) stays cached while the sources change:

    python pyproject_requirements.py pyproject.toml --extra server --build-system

prints [project].dependencies, then each named extra's, then [build-system].requires (so the
sources can be installed afterwards with --no-build-isolation, without reaching an index).
Standard library only: it runs on the bare base image's Python (3.11+, for tomllib).
"""

from __future__ import annotations

import argparse
import tomllib


def requirements(pyproject: dict, extras: list[str], build_system: bool) -> list[str]:
    project = pyproject["project"]
    out = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r} (it has: {', '.join(sorted(optional))})")
        out += optional[extra]
    if build_system:
        out += pyproject.get("build-system", {}).get("requires", [])
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pyproject")
    parser.add_argument("--extra", action="append", default=[], help="an optional-dependencies group to include (repeatable)")
    parser.add_argument("--build-system", action="store_true", help="include [build-system].requires")
    args = parser.parse_args(argv)
    with open(args.pyproject, "rb") as f:
        print("\n".join(requirements(tomllib.load(f), args.extra, args.build_system)))


if __name__ == "__main__":
    main()
