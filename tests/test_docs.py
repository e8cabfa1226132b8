"""The documentation stands alone in a clone of the repository.

- No tracked file points to the developers' design folder next to the repository (a user's clone
  has none): what users need is written in docs/.
- Every relative link in README.md and docs/**/*.md names a file that exists, and every
  ``#anchor`` names a heading of the target page (GitHub's anchor rules); so does every
  ``docs/<page>.md#<anchor>`` that code comments and docstrings name.
- Each algorithm file's defaults table (``| flag of `file` | default | meaning |``) states the
  defaults of its ``Args``, with a row for every flag whose default is particular to the file.
"""
import dataclasses
import math
import re
import subprocess
from pathlib import Path

import pytest
from _baselines_common import load_file

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
    """Comments and docstrings name docs sections as ``docs/<page>.md#<anchor>``; each must exist."""
    broken = []
    for name in tracked_files():
        if not name.endswith((".py", ".toml", ".cff")):
            continue
        text = (ROOT / name).read_text(encoding="utf-8")
        for lineno, line in enumerate(text.splitlines(), 1):
            if name.endswith(".toml") and re.match(r"\s*(table|plots)\s*=", line):
                continue  # a benchmark definition's output destination: written when the grid runs
            for page, anchor in DOC_REF.findall(line):
                dest = ROOT / "docs" / page
                if not dest.is_file():
                    broken.append(f"{name}:{lineno}: docs/{page} (no such file)")
                elif anchor and anchor not in anchors(dest):
                    broken.append(f"{name}:{lineno}: docs/{page}#{anchor} (no such heading)")
    assert not broken, "\n".join(broken)


# ------------------------------------------------------------ defaults in the docs
ALGORITHMS = ["comadice.py", "alberdice.py", "omcda.py"] + [
    f"baselines/{n}.py" for n in ("bc", "optidice", "omiga", "bcq", "cql", "cfcql", "icq", "omar", "madtkd")]
TABLE_HEAD = re.compile(r"^\|\s*flag of `([^`]+)`\s*\|\s*default\s*\|")


def cells(row: str) -> list[str]:
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]]


def docs_defaults() -> dict[str, list[tuple[str, str, str]]]:
    """file -> [(page:line, flag, value)] from every 'flag of `file` | default' table in docs/."""
    out: dict[str, list[tuple[str, str, str]]] = {}
    for page in sorted((ROOT / "docs").rglob("*.md")):
        lines = list(prose_lines(page.read_text(encoding="utf-8")))
        for k, (lineno, line) in enumerate(lines):
            m = TABLE_HEAD.match(line)
            if not m:
                continue
            assert m.group(1) not in out, f"two defaults tables for {m.group(1)}"
            rows = out.setdefault(m.group(1), [])
            for n, row in lines[k + 2:]:  # skip the | --- | line
                if not row.startswith("|"):
                    break
                flag, value = cells(row)[:2]
                rows.append((f"{page.relative_to(ROOT)}:{n}", flag.strip("`"), value))
    return out


def parse_value(text: str):
    """A table value: True / False, auto (None), a number, or a `string`."""
    if text in ("True", "False"):
        return text == "True"
    if text == "auto":
        return None
    if text.startswith("`") and text.endswith("`"):
        return text[1:-1]
    try:
        return int(text)
    except ValueError:
        return float(text)


def args_defaults(file: str) -> dict:
    return {f.name: f.default for f in dataclasses.fields(load_file(file).Args)}


def same_value(got, want) -> bool:
    if any(isinstance(x, (bool, str)) or x is None for x in (got, want)):
        return type(got) is type(want) and got == want
    return math.isclose(got, want, rel_tol=1e-12)


def test_parse_value():
    assert parse_value("1e-3") == 0.001 and parse_value("256") == 256 and parse_value("`soft-chi2`") == "soft-chi2"
    assert parse_value("True") is True and parse_value("auto") is None
    with pytest.raises(ValueError):
        parse_value("128 (official: 64)")  # a value cell holds the value only
    assert same_value(0.001, 1e-3) and same_value(64, 64.0) and not same_value(True, 1) and not same_value(None, 0)


@pytest.mark.parametrize("file", ALGORITHMS)
def test_docs_state_the_defaults_of_the_code(file):
    """Each algorithm's docs page has one defaults table; every value in it is the Args default, and
    every flag whose default is particular to this file (not the same in all twelve) has a row."""
    tables = docs_defaults()
    assert file in tables, f"no 'flag of `{file}` | default' table in docs/"
    code = args_defaults(file)
    everyone = [args_defaults(f) for f in ALGORITHMS]
    common = {n for n in code if all(n in d and repr(d[n]) == repr(code[n]) for d in everyone)}
    wrong, seen = [], set()
    for where, flag, value in tables[file]:
        name = flag.removeprefix("--").replace("-", "_")
        seen.add(name)
        if name not in code:
            wrong.append(f"{where}: {flag} is not a flag of {file}")
            continue
        if not same_value(parse_value(value), code[name]):
            wrong.append(f"{where}: {flag} is documented as {value}, the code's default is {code[name]!r}")
    missing = sorted(set(code) - common - seen)
    assert not wrong and not missing, "\n".join(wrong + [f"{file}: --{n.replace('_', '-')} has no row" for n in missing])
