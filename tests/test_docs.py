"""The README is tested: its Python blocks run, and it documents every public name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import selectserver

README = Path(__file__).resolve().parent.parent / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _sections() -> dict[str, list[str]]:
    """The README's ```python blocks, grouped by their ``## `` section, in order."""
    sections: dict[str, list[str]] = {}
    parts = re.split(r"^## ", README.read_text(encoding="utf-8"), flags=re.MULTILINE)
    for part in ["Introduction\n" + parts[0], *parts[1:]]:
        title = part.splitlines()[0].strip()
        blocks = _BLOCK.findall(part)
        if blocks:
            sections[title] = blocks
    return sections


SECTIONS = _sections()


def test_readme_has_python_examples() -> None:
    assert len(SECTIONS) >= 3
    assert sum(map(len, SECTIONS.values())) >= 10


@pytest.mark.parametrize("title", sorted(SECTIONS))
def test_readme_section_runs(title: str) -> None:
    """Each section's blocks run top to bottom in one namespace, as a reader would paste them."""
    namespace: dict[str, object] = {"__name__": f"readme_{title}"}
    for block in SECTIONS[title]:
        exec(compile(block, f"README.md ({title})", "exec"), namespace)


def test_readme_documents_every_public_name() -> None:
    text = README.read_text(encoding="utf-8")
    undocumented = [name for name in selectserver.__all__ if f"`{name}" not in text]
    assert undocumented == []


def test_all_is_exactly_the_public_names() -> None:
    # isidentifier: pytest's assertion rewriting adds "@py_builtins" to the plugin's package.
    public = {name for name in vars(selectserver) if name.isidentifier() and name[0] != "_"}
    modules = {"reference", "strategies", "plugin", "http"}  # submodules, imported on demand
    assert set(selectserver.__all__) == public - modules
    assert len(selectserver.__all__) == len(set(selectserver.__all__))
