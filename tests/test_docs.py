"""The project's documentation stands on its own: every `docs/methods.md §N` a docstring, config or the
README cites is a section of that file, and nothing points at notes outside the repository."""

import re

from tests.conftest import ROOT

SOURCES = ("analysis", "callbacks", "conf", "models", "scripts", "tests", "trainer", "docs")


def repository_texts() -> dict[str, str]:
    files = [ROOT / "README.md", *(p for d in SOURCES for p in (ROOT / d).rglob("*")
                                   if p.suffix in (".py", ".yaml", ".md") and p.is_file())]
    return {str(p.relative_to(ROOT)): p.read_text() for p in files if p.name != "test_docs.py"}


def test_cited_method_sections_exist() -> None:
    sections = set(re.findall(r"^## (\d+)\. ", (ROOT / "docs" / "methods.md").read_text(), flags=re.M))
    cited = {}
    for name, text in repository_texts().items():
        for match in re.finditer(r"docs/methods\.md §(\d+)(?:-(\d+))?", text):
            for n in range(int(match.group(1)), int(match.group(2) or match.group(1)) + 1):
                cited.setdefault(str(n), name)
    assert cited, "no citation found: the search is broken"
    assert {n: f for n, f in cited.items() if n not in sections} == {}


def test_nothing_points_outside_the_repository() -> None:
    outside = [name for name, text in repository_texts().items()
               if re.search(r"\b(PAPERS|ARCHITECTURE)\.md|\.\./shared/", text)]
    assert outside == []
