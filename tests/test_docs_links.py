"""The README and docs/ link only to files that exist (no link outside the repository, none broken)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def broken_links(pages: list[Path], root: Path = ROOT) -> list[tuple[str, str]]:
    """(page, target) of every relative link that leaves ``root`` or names no file."""
    bad = []
    for page in pages:
        for target in LINK.findall(page.read_text(encoding="utf-8")):
            if target.startswith(("http://", "https://", "mailto:", "#")):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            if not path.is_relative_to(root) or not path.exists():
                bad.append((page.name, target))
    return bad


def test_every_relative_link_resolves_inside_the_repository() -> None:
    pages = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").rglob("*.md"))]
    assert broken_links(pages) == []


def test_a_broken_or_outside_link_is_found(tmp_path: Path) -> None:
    (tmp_path / "repo").mkdir()
    page = tmp_path / "repo" / "page.md"
    (tmp_path / "repo" / "there.md").write_text("")
    (tmp_path / "OUTSIDE.md").write_text("")
    page.write_text("[a](missing.md) [b](../OUTSIDE.md) [c](https://example.org) [d](#here) [e](there.md#x)")
    assert {t for _, t in broken_links([page], tmp_path / "repo")} == {"missing.md", "../OUTSIDE.md"}
