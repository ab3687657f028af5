"""The documentation's links hold: every relative link of README.md and docs/ names a file of the
repository, and every ``#anchor`` a heading of the page it points to (GitHub's anchors: the
heading in lower case, punctuation other than ``-`` and ``_`` dropped, spaces as ``-``, a repeated
heading numbered ``-1``, ``-2``, ...)."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def anchors(page: Path) -> set:
    out, seen = set(), {}
    for line in _without_code(page.read_text()).splitlines():
        m = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = re.sub(r"[^\w\- ]", "", m.group(1).replace("`", "").strip().lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def links() -> list[tuple[Path, str]]:
    found = []
    for page in PAGES:
        for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(page.read_text())):
            if not re.match(r"^[a-z]+:", target):
                found.append((page, target))
    return found


def test_anchor_rule():
    page = ROOT / "docs" / "experiments" / "distillation-seeds.md"
    assert "at-the-shipped-target-guidance-w--10" in anchors(page)


def test_every_relative_link_and_anchor_resolves():
    found = links()
    assert len(found) > 100
    broken = []
    for page, target in found:
        file, _, frag = target.partition("#")
        dest = (page.parent / file).resolve() if file else page
        if not dest.exists():
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "\n".join(broken)


def _sections(page: Path) -> list[str]:
    """Headings and bold paragraph leads (``**Feature groups on the CPU.**``) of a page, plain."""
    text = _without_code(page.read_text())
    found = re.findall(r"^#{1,6}\s+(.*?)\s*$", text, flags=re.M) + re.findall(r"^\*\*(.+?)\*\*", text, flags=re.M)
    return [re.sub(r"[`*]", "", s).strip().rstrip(".") for s in found]


def test_sections_named_in_code_and_pages_exist():
    """References of the form ``docs/<page>.md, "<Section>"`` (docstrings, comments, pages; the quoted
    text may be the start of a longer heading) name a heading or bold paragraph lead of the page."""
    import subprocess
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    cache, refs, broken = {}, 0, []
    for name in files:
        if not name.endswith((".py", ".md", ".sh", ".yaml")) or not (ROOT / name).is_file():
            continue
        flat = re.sub(r"\n\s*(?:#\s*)?", " ", (ROOT / name).read_text(errors="replace"))   # comments joined
        for doc, section in re.findall(r"((?:docs/)?[a-z_/-]+\.md)[,:]?\s+\"([^\"]{3,80})\"", flat):
            page = ROOT / doc if doc.startswith("docs/") else (ROOT / name).parent / doc
            if not page.is_file():
                if doc.startswith("docs/"):
                    broken.append(f"{name}: {doc} (no such page)")
                continue
            refs += 1
            if page not in cache:
                cache[page] = _sections(page)
            if not any(s == section or s.startswith(section) for s in cache[page]):
                broken.append(f"{name}: {doc}, \"{section}\" (no such section)")
    assert refs >= 20 and not broken, "\n".join(broken) or refs
