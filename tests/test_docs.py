"""The documentation: docs/config.md is what tools/make_config_docs.py writes, the README stays short and starts with
the two commands, and every relative link in README.md and docs/*.md leads to a file (and heading). No MindSpore is
loaded."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from urllib.parse import unquote

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import make_config_docs  # noqa: E402

README_MAX_LINES = 210
# [text](target) outside code; a target with a scheme (https:, mailto:) or only an anchor is not a file link
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_config_md_is_generated_from_the_config():
    current = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert current == make_config_docs.render(), make_config_docs.STALE


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (f"README.md has {len(lines)} lines (at most {README_MAX_LINES}: move "
                                            "detail into a page under docs/)")
    assert lines[0].startswith("# ")
    block = lines[lines.index("```") + 1:]
    assert block[0].startswith("pip install -r requirements.txt && python train.py "), block[0]
    assert block[1].startswith("pip install -r requirements-dev.txt && pytest -q "), block[1]
    # the test command is exactly what CI runs
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert "pytest -q" in ci and block[1].split("&&")[1].split("#")[0].strip() == "pytest -q"


def _links(text: str) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", text))
    return LINK.findall(text)


def test_every_relative_link_leads_to_a_file():
    broken = []
    for page in _pages():
        for target in _links(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
                continue
            path = unquote(target.split("#", 1)[0])
            if not (page.parent / path).exists():
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to missing files: {broken}"


def _anchors(text: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_every_anchor_names_a_heading():
    broken = []
    for page in _pages():
        for target in _links(page.read_text(encoding="utf-8")):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or "#" not in target:
                continue
            path, anchor = target.split("#", 1)
            linked = (page.parent / unquote(path)) if path else page
            if linked.suffix == ".md" and linked.is_file() and anchor not in _anchors(linked.read_text("utf-8")):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to missing headings: {broken}"


def test_the_link_check_sees_links():
    assert _links("see [a](docs/a.md#x), `[b](no.md)`, [c](https://x.org)\n```\n[d](e.md)\n```\n") == [
        "docs/a.md#x", "https://x.org"]
    assert _anchors("# Title\n## The configs' recipes\n```\n# not a heading\n```\n## ModelArts / OBS\n") == {
        "title", "the-configs-recipes", "modelarts--obs"}
