"""The documentation's Python examples run as written.

Every fenced ```python block of README.md and docs/*.md is executed, in order, each in a fresh namespace (a reader
copies one block at a time), unless its first line is ``# continues the block above``: then it runs in the previous
block's namespace. They run inside a temporary working directory (files the examples write, such as model.pt2, land
there). A failure names the file, the block number and its first line.
Blocks that are not meant to run use ```text / ```console / ```bash fences, which are not executed. A block whose
first line is ``# needs: pkg [pkg ...]`` (benchmark extras such as the gallery's packages) runs only when those
modules are installed; otherwise it and the blocks after it in that file are skipped, with the reason.
"""
from __future__ import annotations

import importlib.util
import re
import traceback
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: An opening fence ```python (or ```py), its body, and the closing fence at the same indentation.
FENCE = re.compile(r"^(?P<indent>[ \t]*)```[ \t]*(?P<lang>[\w+-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$",
                   re.MULTILINE | re.DOTALL)
PYTHON = {"python", "py", "python3"}
CONTINUES = "# continues the block above"


def doc_files() -> list[Path]:
    """README.md and docs/*.md (those without python blocks contribute no test)."""
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """(line number of the opening fence, dedented code) of every python block of ``path``, in order."""
    text = path.read_text(encoding="utf-8")
    blocks = []
    for match in FENCE.finditer(text):
        if match.group("lang").lower() not in PYTHON:
            continue
        indent = len(match.group("indent"))
        code = "\n".join(line[indent:] for line in match.group("body").splitlines())
        blocks.append((text.count("\n", 0, match.start()) + 1, code))
    return blocks


FILES = [p for p in doc_files() if p.is_file() and python_blocks(p)]


def test_the_extractor_finds_the_readme_blocks() -> None:
    assert python_blocks(REPO / "README.md"), "README.md has no ```python block: is the fence spelled right?"


@pytest.fixture
def one_thread():
    """The examples are small: one torch thread runs them as fast, and does not stall on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="the documentation examples build torchvision models; install torchvision")
@pytest.mark.parametrize("path", FILES, ids=[str(p.relative_to(REPO)) for p in FILES])
def test_python_blocks_run(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    from cora_fx import CoRaDeprecationWarning

    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    name = path.relative_to(REPO)
    blocks = python_blocks(path)
    for number, (line, code) in enumerate(blocks, start=1):
        if not code.lstrip().startswith(CONTINUES):
            namespace = {"__name__": f"docs_{path.stem}"}
        missing = missing_modules(code)
        if missing:
            pytest.skip(f"{name}: python block {number} (line {line}) and later need {missing}, not installed")
        try:
            compiled = compile(code, f"{name}:block{number}(line {line})", "exec")
            with warnings.catch_warnings():
                warnings.simplefilter("error", CoRaDeprecationWarning)  # the docs must not teach deprecated spellings
                exec(compiled, namespace)
        except Exception:
            first = next((row for row in code.splitlines() if row.strip()), "")
            pytest.fail(f"{name}: python block {number} of {len(blocks)} (line {line}: {first!r}) failed:\n"
                        f"{traceback.format_exc()}", pytrace=False)


def missing_modules(code: str) -> list[str]:
    """The modules a ``# needs: a b`` first line names that are not installed."""
    first = code.lstrip().splitlines()[0] if code.strip() else ""
    if not first.startswith("# needs:"):
        return []
    return [m for m in first[len("# needs:"):].split() if importlib.util.find_spec(m) is None]


#: "section 3", "sections 1-2", "sections 2 and 6", "s.4": how the package cites docs/method.md.
SECTION = re.compile(r"\b(?:sections?|s\.)\s*(\d+)(?:\s*(?:-|and|,)\s*(\d+))*")


def method_sections() -> set[int]:
    """The numbers of docs/method.md's ``## N. Title`` headings."""
    text = (REPO / "docs" / "method.md").read_text(encoding="utf-8")
    return {int(n) for n in re.findall(r"^## (\d+)\. ", text, re.MULTILINE)}


def cited_sections(text: str) -> list[int]:
    """Every section number that ``text`` cites after mentioning docs/method.md."""
    if "docs/method.md" not in text:
        return []
    tail = text[text.index("docs/method.md"):]
    return [int(n) for match in SECTION.finditer(tail) for n in match.groups() if n]


def test_every_method_section_cited_in_the_package_exists() -> None:
    sections = method_sections()
    assert set(range(1, 12)) <= sections
    bad = []
    for path in sorted((REPO / "cora_fx").rglob("*.py")):
        cited = cited_sections(path.read_text(encoding="utf-8"))
        bad += [f"{path.name}: section {n}" for n in cited if n not in sections]
    assert not bad, f"citations of docs/method.md sections that do not exist: {bad}"
    assert cited_sections("see docs/method.md section 3 and sections 12 and 4") == [3, 12, 4]
    assert not [p.name for p in (REPO / "cora_fx").rglob("*.py") if "METHOD.md" in p.read_text()]
