"""Print the part of requirements.lock that the worker needs at run time, hashes kept.

requirements.lock pins everything with `uv pip compile --all-extras`, so it also holds the dev tools
(pytest, mypy, ruff, hadolint, ...). The images install only what [project].dependencies (plus the
extras named on the command line, by default `azure-ad`) pull in: the roots, then every locked
package whose "# via" list names a package already kept. The blocks are copied verbatim, so
`pip install --require-hashes -r <output>` checks the same hashes as the full lock.

    python runtime-requirements.py [--lock requirements.lock] [--pyproject pyproject.toml]
                                   [--extra azure-ad ...]

Standard library only: it runs in a bare python image before anything is installed.
"""

from __future__ import annotations

import argparse
import re
import sys
import tomllib
from pathlib import Path

_NAME = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)")
_PROJECT_VIA = re.compile(r"\(pyproject\.toml\)$")


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    match = _NAME.match(spec.strip())
    if not match:
        raise ValueError(f"cannot read a package name from {spec!r}")
    return normalize(match.group(1))


def parse_lock(text: str) -> tuple[list[str], dict[str, tuple[str, list[str]]]]:
    """Return the header lines and {name: (block text, via names)} in file order."""
    header: list[str] = []
    blocks: dict[str, tuple[str, list[str]]] = {}
    current: str | None = None
    lines: list[str] = []
    vias: list[str] = []

    def flush() -> None:
        if current is not None:
            blocks[current] = ("".join(lines), vias)

    in_via = False
    for line in text.splitlines(keepends=True):
        stripped = line.strip()
        if line[:1].isalnum():  # "name==version \" starts a block
            flush()
            current, lines, vias, in_via = requirement_name(line), [line], [], False
            if "==" not in line:
                raise ValueError(f"not pinned: {stripped}")
            continue
        if current is None:
            header.append(line)
            continue
        lines.append(line)
        if stripped.startswith("# via"):
            rest = stripped.removeprefix("# via").strip()
            in_via = not rest
            if rest:
                vias.append(rest)
        elif in_via and stripped.startswith("#"):
            vias.append(stripped.lstrip("#").strip())
        else:
            in_via = False
    flush()
    return header, blocks


def runtime_roots(pyproject: dict[str, object], extras: list[str]) -> set[str]:
    project = pyproject["project"]
    assert isinstance(project, dict)
    specs = list(project.get("dependencies", []))
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        if extra not in optional:
            raise SystemExit(f"pyproject.toml has no extra {extra!r}")
        specs.extend(optional[extra])
    return {requirement_name(spec) for spec in specs}


def select(blocks: dict[str, tuple[str, list[str]]], roots: set[str]) -> list[str]:
    missing = roots - blocks.keys()
    if missing:
        raise SystemExit(f"requirements.lock lacks {sorted(missing)}: regenerate it")
    keep = set(roots)
    changed = True
    while changed:
        changed = False
        for name, (_, vias) in blocks.items():
            if name in keep:
                continue
            parents = {requirement_name(via) for via in vias if not _PROJECT_VIA.search(via)}
            if parents & keep:
                keep.add(name)
                changed = True
    return [name for name in blocks if name in keep]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lock", type=Path, default=Path("requirements.lock"))
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    parser.add_argument(
        "--extra", action="append", default=None, help="extras to include (default: azure-ad)"
    )
    args = parser.parse_args(argv)
    extras = args.extra if args.extra is not None else ["azure-ad"]
    _, blocks = parse_lock(args.lock.read_text(encoding="utf-8"))
    roots = runtime_roots(tomllib.loads(args.pyproject.read_text(encoding="utf-8")), extras)
    names = select(blocks, roots)
    sys.stdout.write(
        f"# Generated from {args.lock.name} by deploy/docker/runtime-requirements.py"
        f" (dependencies + extras {extras}); do not edit.\n"
    )
    for name in names:
        sys.stdout.write(blocks[name][0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
