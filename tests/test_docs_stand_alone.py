"""The repository's documents stand alone: nothing cites a document that is not in it.

Scans every file git tracks (text files only; generated run records under ``docs/runs/``
are left out) for three kinds of dangling reference:

(a) the two planning documents that once lived outside the repository (their names are
    assembled below, so that this file does not mention them itself); their content is
    now ``docs/theory.md`` and ``docs/design.md``;
(b) relative markdown links and images ``[text](path)`` in ``*.md`` files whose target,
    without its ``#anchor``, does not exist relative to the file (URLs with a scheme,
    such as http(s) and mailto, and pure ``#anchor`` links are not checked; neither is
    anything inside code blocks or inline code);
(c) ``docs/<name>.md`` named in any text file, when there is no such file.

"In the repository" means tracked, or new and not ignored by git: a file that only
exists in an ignored directory (``outputs/``, ``multirun/``) is missing on a fresh clone.
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parents[1]

SKIPPED_DIRS = ("docs/runs/",)
"""Generated records of real runs, kept verbatim."""

_OUTSIDE = ("PAPER", "DESIGN")
OUTSIDE_DOCUMENT = re.compile(r"\b(?:" + "|".join(_OUTSIDE) + r")\.md\b")
"""(a): the documents that are not in the repository (case-sensitive: ``docs/design.md``
is fine)."""

INLINE_LINK = re.compile(r"\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+[\"'(][^)]*)?\)")
REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]\n]+\]:\s*<?([^\s>]+)>?")
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
DOCS_PAGE = re.compile(r"(?<![\w.-])docs/[\w.-]+\.md\b")
"""(c): a path ``docs/<name>.md``, not part of a longer name such as ``mydocs/``."""


def _git_files(*args: str) -> list[str]:
    out = subprocess.run(
        ["git", "ls-files", "-z", *args], cwd=ROOT, capture_output=True, check=True
    ).stdout
    return [p for p in out.decode("utf-8").split("\0") if p]


@cache
def tracked_text_files() -> dict[str, str]:
    """Path (relative, POSIX) -> text of every tracked text file outside SKIPPED_DIRS."""
    files: dict[str, str] = {}
    for rel in _git_files("--cached"):
        if rel.startswith(SKIPPED_DIRS):
            continue
        path = ROOT / rel
        if not path.is_file():  # deleted in the working tree
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        try:
            files[rel] = data.decode("utf-8")
        except UnicodeDecodeError:
            continue
    return files


@cache
def repository_paths() -> frozenset[str]:
    """Every file in the repository (tracked, or new and not ignored) and every directory
    holding one, relative POSIX paths."""
    paths: set[str] = set()
    for rel in _git_files("--cached", "--others", "--exclude-standard"):
        if not (ROOT / rel).exists():
            continue
        paths.add(rel)
        parts = rel.split("/")
        paths.update("/".join(parts[:i]) for i in range(1, len(parts)))
    return frozenset(paths)


def in_repository(path: Path) -> bool:
    try:
        rel = path.resolve().relative_to(ROOT)
    except ValueError:  # outside the checkout
        return False
    return rel.as_posix() == "." or rel.as_posix() in repository_paths()


def prose_lines(text: str) -> list[tuple[int, str]]:
    """(line number, line) of a markdown text without fenced or indented code blocks,
    with inline code spans blanked out."""
    out: list[tuple[int, str]] = []
    fence: str | None = None
    indented = False
    previous_blank = True
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.lstrip()
        marker = re.match(r"(`{3,}|~{3,})", stripped)
        if fence is not None:
            if marker and marker.group(1).startswith(fence):
                fence = None
            previous_blank = False
            continue
        if marker and len(line) - len(stripped) < 4:
            fence = marker.group(1)
            continue
        blank = not stripped
        code = line.startswith(("    ", "\t")) and not blank
        indented = code and (previous_blank or indented)
        if not indented and not blank:
            out.append((number, re.sub(r"`+[^`]*`+", "", line)))
        if not blank and not code:
            indented = False
        previous_blank = blank
    return out


def outside_document_mentions() -> list[str]:
    return [
        f"{rel}:{number}: cites {match.group(0)}, which is not in the repository"
        for rel, text in tracked_text_files().items()
        for number, line in enumerate(text.splitlines(), start=1)
        for match in OUTSIDE_DOCUMENT.finditer(line)
    ]


def broken_markdown_links() -> list[str]:
    problems = []
    for rel, text in tracked_text_files().items():
        if not rel.endswith(".md"):
            continue
        base = (ROOT / rel).parent
        for number, line in prose_lines(text):
            targets = [m.group(1) for m in INLINE_LINK.finditer(line)]
            targets += [m.group(1) for m in REFERENCE_LINK.finditer(line)]
            for target in targets:
                if SCHEME.match(target) or target.startswith("#"):
                    continue
                path_part = unquote(target.split("#", 1)[0].split("?", 1)[0])
                if path_part.startswith("/"):  # from the repository root
                    resolved = ROOT / path_part.lstrip("/")
                else:
                    resolved = base / path_part
                if not in_repository(resolved):
                    problems.append(f"{rel}:{number}: link to {target!r}, which does not exist")
    return problems


def missing_docs_pages() -> list[str]:
    return [
        f"{rel}:{number}: names {match.group(0)}, which does not exist"
        for rel, text in tracked_text_files().items()
        for number, line in enumerate(text.splitlines(), start=1)
        for match in DOCS_PAGE.finditer(line)
        if not in_repository(ROOT / match.group(0))
    ]


def _report(problems: list[str]) -> str:
    return f"{len(problems)} dangling reference(s):\n" + "\n".join(problems)


def test_no_file_cites_the_documents_outside_the_repository() -> None:
    problems = outside_document_mentions()
    assert not problems, _report(problems)


def test_relative_markdown_links_resolve() -> None:
    problems = broken_markdown_links()
    assert not problems, _report(problems)


def test_named_docs_pages_exist() -> None:
    problems = missing_docs_pages()
    assert not problems, _report(problems)


def test_the_checks_catch_what_they_should() -> None:
    """The scanners on made-up text, so that a regex that matches nothing cannot pass."""
    outside = _OUTSIDE[0] + ".md"
    assert OUTSIDE_DOCUMENT.search(f"see {outside} §3")
    assert not OUTSIDE_DOCUMENT.search("see docs/design.md, Scale")
    md = (
        "[a](theory.md#1-objects) ![b](figures/x.png) [c](https://example.org) [d](#top)\n"
        "`[e](nowhere.md)`\n\n    [f](code.md)\n\n```\n[g](fenced.md)\n```\n[h]: ref.md\n"
    )
    found = [m.group(1) for _, line in prose_lines(md) for m in INLINE_LINK.finditer(line)]
    assert found == ["theory.md#1-objects", "figures/x.png", "https://example.org", "#top"]
    assert [m.group(1) for m in REFERENCE_LINK.finditer("[h]: ref.md")] == ["ref.md"]
    assert DOCS_PAGE.findall("see docs/theory.md §1 and mydocs/x.md") == ["docs/theory.md"]
    assert in_repository(ROOT / "docs" / "theory.md")
    assert not in_repository(ROOT / "docs" / "no_such_page.md")
