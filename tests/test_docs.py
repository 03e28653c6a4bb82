"""The README stays a five-minute read, and every page it hands the rest to is linked and reachable."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PAGES = sorted((REPO / "docs").glob("*.md"))


def anchors(page: Path) -> set[str]:
    """The GitHub anchors of a page's headings (code blocks skipped)."""
    found, in_code = set(), False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        elif not in_code and line.startswith("#"):
            title = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower())
            found.add(title.replace(" ", "-"))
    return found


def local_links(page: Path) -> list[str]:
    return [link for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8")) if "://" not in link]


def test_the_readme_is_at_most_15_kb():
    assert len(README.read_bytes()) <= 15 * 1024


def test_the_readme_links_every_docs_page():
    linked = {(README.parent / link.partition("#")[0]).resolve() for link in local_links(README)}
    assert len(PAGES) >= 8
    assert [page.name for page in PAGES if page.resolve() not in linked] == []


@pytest.mark.parametrize("page", [README, *PAGES], ids=lambda page: page.name)
def test_every_local_link_reaches_its_file_and_heading(page: Path):
    for link in local_links(page):
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.is_file(), f"{page.name}: {link}"
        assert not anchor or anchor in anchors(target), f"{page.name}: {link}"


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_every_docs_page_opens_with_its_contents_and_links_back(page: Path):
    text = page.read_text(encoding="utf-8")
    first_section = re.search(r"^## .*$", text, re.MULTILINE)
    assert first_section and first_section.group(0) == "## Contents"
    assert "](../README.md)" in text


def test_ci_runs_the_tests_as_the_install_page_says():
    """`.ci/run` runs the commands of docs/install.md's "Run the tests" block, and no other pytest command."""
    page = (REPO / "docs" / "install.md").read_text(encoding="utf-8")
    block = page.split("\n## Run the tests\n", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = block.strip().splitlines()
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert all(command in ci for command in commands), commands
    (pytest_command,) = [command for command in commands if command.startswith("pytest")]
    assert {line for line in ci if line.startswith("pytest")} == {pytest_command}
