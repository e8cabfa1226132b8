"""The documentation stands alone in a clone of the repository.

- No tracked file points outside the repository to the project's private design folder
  (the ``../shared`` path the developers use): what users need is written in docs/.
- Every relative link in README.md and docs/**/*.md names a file that exists, and every
  ``#anchor`` names a heading of the target page (GitHub's anchor rules).
"""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OUTSIDE = "../" + "shared"  # spelled in two parts so that this file does not match itself
NOTES = re.compile(r"(^|/)DEVELOPERS[^/]*$")  # developer notes may name the design folder


def tracked_files() -> list[str]:
    try:
        out = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    return [f for f in out.decode().split("\0") if f]


def test_no_file_points_outside_the_repository():
    offenders = []
    for name in tracked_files():
        path = ROOT / name
        if NOTES.search(name) or not path.is_file():
            continue
        data = path.read_bytes()
        if b"\0" in data:
            continue  # binary (weights, images)
        for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if OUTSIDE in line:
                offenders.append(f"{name}:{lineno}: {line.strip()[:100]}")
    assert not offenders, "point to a docs/ section instead of the design folder:\n" + "\n".join(offenders)


# ------------------------------------------------------------------ Markdown links
FENCE = re.compile(r"^\s*(```|~~~)")
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE_SPAN = re.compile(r"(`+)(.+?)\1")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str):
    """(line number, line) of the lines outside fenced code blocks."""
    fenced = False
    for lineno, line in enumerate(text.splitlines(), 1):
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            yield lineno, line


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: the rendered text, lower case, punctuation dropped
    (letters, digits, '_', '-' and spaces kept), spaces turned into '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = CODE_SPAN.sub(lambda m: m.group(2), text)
    text = re.sub(r"<[^>]+>", "", text).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, line in prose_lines(path.read_text(encoding="utf-8")):
        m = HEADING.match(line)
        if not m:
            continue
        base = slug(m.group(2))
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def test_slug_follows_github():
    assert slug("Bridge (`bridge`)") == "bridge-bridge"
    assert slug("Penalty-XOR and Bridge: exact rules") == "penalty-xor-and-bridge-exact-rules"
    assert slug('`obs_mode="omiga"` (default)') == "obs_modeomiga-default"
    assert slug("Results here: every baseline on Bridge and on Hopper-3x1") == \
        "results-here-every-baseline-on-bridge-and-on-hopper-3x1"


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(page):
    broken = []
    for lineno, line in prose_lines(page.read_text(encoding="utf-8")):
        for target in LINK.findall(CODE_SPAN.sub("", line)):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
                continue  # http:, https:, mailto:
            file, _, anchor = target.partition("#")
            dest = (page.parent / file).resolve() if file else page
            where = f"{page.relative_to(ROOT)}:{lineno}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif ROOT not in dest.parents and dest != ROOT:
                broken.append(f"{where} (outside the repository)")
            elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
                broken.append(f"{where} (no such heading)")
    assert not broken, "\n".join(broken)


DOC_REF = re.compile(r"\bdocs/([\w./-]+\.md)(?:#([\w-]+))?")


def test_code_points_to_docs_that_exist():
    """Comments and docstrings name docs sections as ``docs/page.md#anchor``; each must exist."""
    broken = []
    for name in tracked_files():
        if not name.endswith((".py", ".toml", ".cff")):
            continue
        text = (ROOT / name).read_text(encoding="utf-8")
        for lineno, line in enumerate(text.splitlines(), 1):
            for page, anchor in DOC_REF.findall(line):
                dest = ROOT / "docs" / page
                if not dest.is_file():
                    broken.append(f"{name}:{lineno}: docs/{page} (no such file)")
                elif anchor and anchor not in anchors(dest):
                    broken.append(f"{name}:{lineno}: docs/{page}#{anchor} (no such heading)")
    assert not broken, "\n".join(broken)
