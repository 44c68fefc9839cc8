"""The README's layout table matches the tree: every module is named there, and every path it names
exists (a file moved or renamed without the README fails here)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout_section() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index("\n## Layout\n")
    return text[start : text.index("\n## ", start + 1)]


def test_every_module_is_named_in_the_layout() -> None:
    section = layout_section()
    named = set(re.findall(r"`([^`]+)`", section))
    missing = []
    for path in sorted([*ROOT.joinpath("sidecar").rglob("*.py"), *ROOT.joinpath("a1111").rglob("*.py")]):
        if path.name in {"__init__.py", "__main__.py"} or "__pycache__" in path.parts:
            continue
        relative = path.relative_to(ROOT).as_posix()
        if relative not in named and path.name not in named:
            missing.append(relative)
    assert missing == [], f"modules the README's layout does not name: {missing}"


def test_every_path_the_layout_names_exists() -> None:
    section = layout_section()
    # paths, not endpoints (/readyz); a short one (assets/) is relative to the package its row is about
    paths = [p for p in re.findall(r"`([^`\s]+)`", section) if "/" in p and not p.startswith(("<", "/"))]
    assert paths, "the layout names no paths"
    bases = [ROOT, ROOT / "sidecar", ROOT / "a1111"]
    gone = [p for p in paths if not any((base / p.rstrip("/")).exists() for base in bases)]
    assert gone == [], f"paths in the README's layout that do not exist: {gone}"
