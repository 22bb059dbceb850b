"""The documentation that ships with the project (docs/*.md) stays usable by someone who only has this repository:

- no file points to material outside it (the design notes and reference studies the project was built from);
- every relative link in docs/*.md resolves, anchors included, and every `docs/<page>.md#<anchor>` pointer anywhere in
  the repository names an existing page and heading;
- every `densediff/...py` and `conf/...yaml` path the docs mention exists;
- README.md lists every docs page.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SKIP_DIRS = {".git", ".venv", "outputs", "__pycache__", "node_modules", ".pytest_cache", "build", "dist"}

# Pointers to documents a clone of this repository does not have. The patterns are assembled from pieces so that this
# file does not match itself.
OUTSIDE_POINTERS = [
    re.compile(r"\.\./" + "shared"),
    re.compile("DESIGN" + r"\.md"),
    re.compile(r"(?<![\w.-])" + "specs" + "/"),
    # short references into those studies: "spec 2.6", "specs B1", "spec Part C", "spec section 3"
    re.compile(r"\b" + "spec" + r"s?\s+(?:[A-D]\d\b|\d+\.\d|Part [A-D]\b|section \d)"),
]
DOC_POINTER = re.compile(r"docs/([\w-]+\.md)(?:#([\w-]+))?")
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SOURCE_PATH = re.compile(r"(?<![\w./-])((?:densediff/[\w/]+\.py)|(?:conf/[\w/]+\.yaml))\b")


def repository_files() -> list[Path]:
    """Tracked and untracked, not ignored, files (git), or a walk of the tree without build and output folders."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout.decode()
        files = [ROOT / name for name in out.split("\0") if name]
    except (OSError, subprocess.SubprocessError):
        files = [p for p in ROOT.rglob("*") if not SKIP_DIRS & set(p.relative_to(ROOT).parts)]
    return sorted(p for p in files if p.is_file())


def text_of(path: Path) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None  # binary (weights, images)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def heading_anchors(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a Markdown page (code blocks skipped): lower case, punctuation dropped,
    spaces to hyphens, repeated headings numbered -1, -2, ...; plus explicit <a id="..."> / <a name="..."> anchors."""
    anchors, seen, fenced = set(), {}, False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        match = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    anchors |= set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", markdown))
    return anchors


def doc_pages() -> list[Path]:
    return sorted(DOCS.glob("*.md"))


def test_docs_exist():
    names = {p.name for p in doc_pages()}
    assert {"architecture.md", "paradigms.md", "protocols.md", "data.md"} <= names, names


def test_no_pointers_outside_the_repository():
    offenders = []
    this_file = Path(__file__).resolve()
    for path in repository_files():
        if path.resolve() == this_file:
            continue
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            if any(pattern.search(line) for pattern in OUTSIDE_POINTERS):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not offenders, ("these lines point to documents a clone of the repository does not have; point to the "
                           "right docs/ page instead:\n" + "\n".join(offenders))


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.name)
def test_relative_links_resolve(page: Path):
    text = page.read_text()
    broken = []
    for target in MD_LINK.findall(text):
        if re.match(r"[a-z][\w+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        destination = (page.parent / file_part).resolve() if file_part else page
        if not destination.exists():
            broken.append(f"{target}: {destination} does not exist")
        elif anchor and destination.suffix == ".md" and anchor not in heading_anchors(destination.read_text()):
            broken.append(f"{target}: no heading with anchor #{anchor} in {destination.name}")
    assert not broken, f"{page.name}:\n" + "\n".join(broken)


def test_docs_pointers_in_the_repository_resolve():
    anchors = {p.name: heading_anchors(p.read_text()) for p in doc_pages()}
    broken = []
    for path in repository_files():
        text = text_of(path)
        if text is None:
            continue
        for number, line in enumerate(text.splitlines(), 1):
            for page, anchor in DOC_POINTER.findall(line):
                if page not in anchors:
                    broken.append(f"{path.relative_to(ROOT)}:{number}: docs/{page} does not exist")
                elif anchor and anchor not in anchors[page]:
                    broken.append(f"{path.relative_to(ROOT)}:{number}: docs/{page} has no heading #{anchor}")
    assert not broken, "\n".join(broken)


@pytest.mark.parametrize("page", doc_pages(), ids=lambda p: p.name)
def test_source_paths_in_docs_exist(page: Path):
    missing = sorted({path for path in SOURCE_PATH.findall(page.read_text()) if not (ROOT / path).is_file()})
    assert not missing, f"{page.name} names files that do not exist: {missing}"


def test_readme_lists_the_docs():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^## Documentation\s*$", readme, re.MULTILINE), "README.md has no '## Documentation' section"
    missing = [p.name for p in doc_pages() if f"docs/{p.name}" not in readme]
    assert not missing, f"README.md does not list {missing}"
