"""The documents a newcomer walks: README.md and docs/*.md.

Every relative link must lead somewhere (a file that exists and, for `#anchor`, a heading of that
file under GitHub's slug rule), every `python -m MODULE` must name a module that exists, and the
README stays short enough to read in one sitting (the long sections live in docs/). A moved
module or a renamed heading breaks a newcomer's path silently; these checks make it loud.
Nothing here imports the modules it checks (importlib.util.find_spec only imports their parent
packages), so the file runs in well under a second.
"""

from __future__ import annotations

import collections
import importlib.util
import pathlib
import re

import pytest

ROOT = next(p for p in pathlib.Path(__file__).resolve().parents if (p / "pyproject.toml").exists())
README_MAX_LINES = 320

FENCE = re.compile(r"^\s*(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
# `python -m MODULE`, also with interpreter options before -m (`python -X importtime -m ...`),
# a venv path (`.venv/bin/python -m pytest`) or a line break inside the command.
PYTHON_M = re.compile(r"\bpython3?((?:\s+-(?!m\b)\S+(?:\s+(?!-)[^\s`]+)?)*?)\s+-m\s+([A-Za-z_][\w.]*)")
URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def documents() -> list[pathlib.Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks: a `## heading` or `[a](b)` inside a fence is code."""
    out, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        out.append("" if in_fence else line)
    return out


def github_slug(heading: str) -> str:
    """GitHub's anchor for a heading: its rendered text, lower-cased, punctuation dropped (letters,
    digits, `_`, `-` and spaces kept), spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)   # a link renders as its text
    text = text.replace("`", "").replace("*", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """Every anchor GitHub gives the headings of a markdown file (a repeated slug gets -1, -2...)."""
    seen: collections.Counter[str] = collections.Counter()
    out = set()
    for line in prose_lines(path.read_text(encoding="utf-8")):
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        out.add(slug if not seen[slug] else f"{slug}-{seen[slug]}")
        seen[slug] += 1
    return out


def relative_links(path: pathlib.Path) -> list[str]:
    """The link targets of a markdown file that point inside the repository (no URL scheme)."""
    prose = INLINE_CODE.sub("", "\n".join(prose_lines(path.read_text(encoding="utf-8"))))
    return [t for t in LINK.findall(prose) if not URL_SCHEME.match(t)]


def shown(path: pathlib.Path) -> str:
    return str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path)


def broken_link(path: pathlib.Path, target: str) -> str | None:
    """Why a link of `path` leads nowhere, or None when it resolves."""
    file_part, _, anchor = target.partition("#")
    dest = (path.parent / file_part).resolve() if file_part else path
    if not dest.exists():
        return f"{target}: no file {shown(dest)}"
    if anchor and dest.suffix == ".md" and anchor not in anchors(dest):
        return f"{target}: no heading with anchor #{anchor} in {shown(dest)}"
    return None


def python_m_modules(path: pathlib.Path) -> list[str]:
    """Every module a `python -m MODULE` in the file names (code blocks and inline code included)."""
    text = path.read_text(encoding="utf-8")
    return [m.group(2).rstrip(".") for m in PYTHON_M.finditer(text)]


def runnable_module_problem(name: str) -> str | None:
    """Why `python -m name` cannot run, or None. find_spec imports the parent packages only (never
    the module itself); a package must hold a __main__.py, looked for on disk, not imported. A
    prefixlm module must come from this checkout: an editable install's finder can map a name
    the checkout lacks to another tree's file."""
    try:
        spec = importlib.util.find_spec(name)
    except ModuleNotFoundError as err:
        return f"{name}: {err}"
    if spec is None:
        return f"{name}: no such module"
    if name.split(".")[0] == "prefixlm" and spec.origin and not pathlib.Path(spec.origin).is_relative_to(ROOT):
        return f"{name}: found outside this checkout, at {spec.origin} (an editable install of another tree)"
    if spec.submodule_search_locations is not None:
        if not any((pathlib.Path(d) / "__main__.py").exists() for d in spec.submodule_search_locations):
            return f"{name}: a package without __main__.py (python -m cannot run it)"
    return None


@pytest.mark.parametrize("path", documents(), ids=shown)
def test_every_relative_link_leads_to_a_file_and_heading(path):
    broken = [why for t in relative_links(path) if (why := broken_link(path, t))]
    assert not broken, f"{shown(path)}: broken links:\n" + "\n".join(broken)


@pytest.mark.parametrize("path", documents(), ids=shown)
def test_every_python_m_command_names_a_module_that_exists(path):
    problems = sorted({why for m in python_m_modules(path) if (why := runnable_module_problem(m))})
    assert not problems, f"{shown(path)}: python -m of a missing module:\n" + "\n".join(problems)


def test_the_readme_is_short_and_links_every_document():
    readme = ROOT / "README.md"
    lines = readme.read_text(encoding="utf-8").count("\n")
    assert lines <= README_MAX_LINES, (
        f"README.md has {lines} lines (at most {README_MAX_LINES}): move the long section to docs/")
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in relative_links(readme)}
    orphans = [d.name for d in documents()[1:] if d.resolve() not in linked]
    assert not orphans, f"docs/ files the README does not link: {orphans}"


def test_the_link_checker_catches_a_missing_file_and_a_missing_anchor(tmp_path):
    """The checks themselves: a wrong path, a wrong anchor, a link inside code (ignored), a fenced
    heading (not an anchor), a repeated heading (-1) and GitHub's slug of a code heading."""
    doc = tmp_path / "a.md"
    (tmp_path / "b.md").write_text("# Title\n\n## The memory plan (`--dry_run`)\n\n## Seeds\n\n"
                                   "## Seeds\n\n```\n## Fenced\n```\n")
    doc.write_text("[ok](b.md#the-memory-plan---dry_run) [ok](b.md#seeds-1) [ok](#top)\n"
                   "[no file](c.md) [no anchor](b.md#fenced) [web](https://x.org/y.md)\n"
                   "`[code](nowhere.md)`\n\n# Top\n")
    assert anchors(tmp_path / "b.md") == {"title", "the-memory-plan---dry_run", "seeds", "seeds-1"}
    links = relative_links(doc)
    assert links == ["b.md#the-memory-plan---dry_run", "b.md#seeds-1", "#top", "c.md", "b.md#fenced"]
    assert [t for t in links if broken_link(doc, t)] == ["c.md", "b.md#fenced"]


def test_the_module_checker_reads_commands_as_written(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("`python -m prefixlm.report --help`, `python -X importtime -m\nprefixlm.plots`\n"
                   ".venv/bin/python -m pytest -q; python3 -m venv /tmp/v; (each is also `python -m` "
                   "its module); run python -m prefixlm.no_such_module.\n")
    assert python_m_modules(doc) == ["prefixlm.report", "prefixlm.plots", "pytest", "venv",
                                     "prefixlm.no_such_module"]
    assert runnable_module_problem("prefixlm.report") is None
    assert runnable_module_problem("prefixlm.no_such_module") is not None
    assert runnable_module_problem("prefixlm") is not None   # a package without __main__.py
