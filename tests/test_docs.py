"""The documentation points at files that exist, the README stays short, and docs/index.md lists every page.

Checked in README.md, CHANGELOG.md, CONTRIBUTING.md and docs/**/*.md, outside fenced code blocks:
- every relative markdown link `[text](path)` (resolved from the file's folder, `#anchor` stripped);
- every backticked path that starts with docs/, recipes/, notebooks/, scripts/ or lowrank_rlhf/ (resolved from the
  repository root; its first word, without `::test` or `#anchor`).
Links to http(s) and mailto are not followed; paths holding `*`, `{`, `RUN`, `OUT` or `<` are patterns, not files.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
TOP_LEVEL = ("README.md", "CHANGELOG.md", "CONTRIBUTING.md")
PATH_PREFIXES = ("docs/", "recipes/", "notebooks/", "scripts/", "lowrank_rlhf/")
PATTERN_MARKS = ("*", "{", "RUN", "OUT", "<")
INDEXED_FOLDERS = (DOCS, DOCS / "guides", DOCS / "results")
README_MAX_LINES = 200

FENCE = re.compile(r"^ {0,3}(```|~~~).*?^ {0,3}\1[^\n]*$", re.MULTILINE | re.DOTALL)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def markdown_files() -> list[Path]:
    return [ROOT / name for name in TOP_LEVEL if (ROOT / name).is_file()] + sorted(DOCS.rglob("*.md"))


def is_pattern(path: str) -> bool:
    return any(mark in path for mark in PATTERN_MARKS)


def references(doc: Path) -> list[tuple[str, Path]]:
    """(as written, the file it must be) for every relative link and backticked repository path in `doc`."""
    text = FENCE.sub("", doc.read_text())
    found = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.IGNORECASE) or target.startswith("#"):
            continue  # http(s), mailto, ...; or an anchor in the same file
        path = target.split("#", 1)[0]
        if path and not is_pattern(path):
            found.append((target, (doc.parent / path).resolve()))
    for span in CODE.findall(text):
        span = span.strip()
        if not span.startswith(PATH_PREFIXES) or is_pattern(span):
            continue
        path = span.split()[0].split("::", 1)[0].split("#", 1)[0].rstrip(".,;:")
        found.append((span, ROOT / path))
    return found


def broken(doc: Path) -> list[str]:
    return [f"{doc.relative_to(ROOT) if doc.is_relative_to(ROOT) else doc}: {written}"
            for written, path in references(doc) if not path.exists()]


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_links_and_paths_point_to_files_that_exist(doc):
    assert not broken(doc), "broken links or paths:\n" + "\n".join(broken(doc))


def test_the_checker_finds_a_broken_link_and_a_broken_path(tmp_path):
    doc = tmp_path / "page.md"
    doc.write_text("[ok](page.md#top) [gone](missing.md) `docs/no-such-page.md` `recipes/tiny-cpu.yaml`\n"
                   "[web](https://example.com) `docs/benchmarks/clickbait-{a,b}.md` `lowrank_rlhf/cli.py --help`\n"
                   "```\n[in a code block](nowhere.md) `docs/nowhere.md`\n```\n")
    assert broken(doc) == [f"{doc}: missing.md", f"{doc}: docs/no-such-page.md"]


def test_the_readme_is_short_and_names_the_test_command():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, f"README.md has {len(text.splitlines())} lines"
    assert "make test" in text  # CI runs the README's test command


def test_the_index_links_every_page():
    index = DOCS / "index.md"
    linked = {path for _, path in references(index)}
    pages = {p.resolve() for folder in INDEXED_FOLDERS for p in folder.glob("*.md") if p.name != "index.md"}
    assert pages, "no pages found under docs/"
    assert not pages - linked, "docs/index.md does not link: " + ", ".join(
        sorted(str(p.relative_to(ROOT)) for p in pages - linked))
