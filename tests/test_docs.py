"""The code shown in README.md and docs/*.md runs here, so the documentation cannot rot.

Convention for whoever edits the documentation:

* A fenced ``python`` block whose opening fence is immediately preceded by an HTML comment
  ``<!-- file: NAME -->`` (only blank lines may stand between the two) is a file of an
  example project. NAME is a relative path such as ``conftest.py`` or ``test_orders.py``.
* A *section* of a document runs from one ``## `` heading to the next; ``###`` subsections
  belong to their ``##`` section, and the text before the first ``##`` heading is a section
  of its own. All the files of one section make one project: they are written to a fresh
  pytester directory and run in a subprocess with ``pytest -n 2 -p no:cacheprovider``. The
  run must pass: at least one test passed, none failed, no errors. Sections are
  independent of each other, so each may have its own ``conftest.py``.
* ``<!-- file: NAME expect: failed -->`` on any block of a section means that the section's
  run must instead report at least one failed or errored test, for examples that show what
  a failure looks like.
* A file name used twice in one section is an error.
* Every other ``python`` block must at least compile.

Besides running the examples, these tests check what the prose promises about the code: the
README's two set-up commands, the README's options table against ``pytest --help``, the JSON
report's fields against the schema table in docs/report.md, and every relative link.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

README_TEST_COMMAND = (
    "python3 -m venv .venv && .venv/bin/pip install -e '.[test]' && .venv/bin/pytest"
)
DEMO_DIR = "examples/sqlite_demo"

# Inner runs: two workers, nothing cached between runs. Hypothesis' pytest plugin is not
# needed by any example and makes each xdist worker start noticeably slower.
INNER_ARGS = ("-n", "2", "-p", "no:cacheprovider", "-p", "no:hypothesispytest")
INNER_TIMEOUT = 100


_FENCE = re.compile(r"^(?P<fence>```+|~~~+)\s*(?P<lang>[\w+-]*)")
_FILE_COMMENT = re.compile(
    r"^<!--\s*file:\s*(?P<name>[\w./-]+)(?:\s+expect:\s*(?P<expect>passed|failed))?\s*-->$"
)


@dataclass
class Block:
    doc: Path
    line: int  # of the opening fence, 1-based
    lang: str
    source: str
    section: str
    file: str | None = None
    expect: str = "passed"

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


@dataclass
class Section:
    doc: Path
    title: str
    blocks: list[Block] = field(default_factory=list)

    @property
    def id(self) -> str:
        return f"{self.doc.relative_to(ROOT)}::{self.title}"


def parse_blocks(doc: Path) -> list[Block]:
    """Every fenced code block of ``doc``, with its section and file comment."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    section = "(top)"
    pending_comment: re.Match[str] | None = None
    i = 0
    while i < len(lines):
        line = lines[i]
        opening = _FENCE.match(line)
        if opening is None:
            if line.startswith("## "):
                section = line[3:].strip()
            stripped = line.strip()
            comment = _FILE_COMMENT.match(stripped)
            if comment is not None:
                pending_comment = comment
            elif stripped:
                pending_comment = None
            i += 1
            continue
        fence = opening["fence"]
        body: list[str] = []
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            body.append(lines[j])
            j += 1
        assert j < len(lines), f"{doc.name}:{i + 1}: code block is never closed"
        block = Block(doc, i + 1, opening["lang"], "\n".join(body) + "\n", section)
        if pending_comment is not None:
            block.file = pending_comment["name"]
            block.expect = pending_comment["expect"] or "passed"
        blocks.append(block)
        pending_comment = None
        i = j + 1
    return blocks


def all_blocks() -> list[Block]:
    return [block for doc in DOCUMENTS for block in parse_blocks(doc)]


def runnable_sections() -> list[Section]:
    sections: dict[tuple[Path, str], Section] = {}
    for block in all_blocks():
        if block.file is None:
            continue
        key = (block.doc, block.section)
        sections.setdefault(key, Section(block.doc, block.section)).blocks.append(block)
    return list(sections.values())


def python_blocks() -> list[Block]:
    return [b for b in all_blocks() if b.lang == "python"]


def section_of(doc: Path, title: str) -> list[str]:
    """The lines of the ``## title`` section of ``doc``, heading excluded."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    start = lines.index(f"## {title}") + 1
    end = next((k for k in range(start, len(lines)) if lines[k].startswith("## ")), len(lines))
    return lines[start:end]


def run_inner(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    return pytester.runpytest_subprocess(*INNER_ARGS, *args, timeout=INNER_TIMEOUT)


def outcomes(result: pytest.RunResult) -> dict[str, int]:
    try:
        return result.parseoutcomes()
    except ValueError:
        return {}


def describe(result: pytest.RunResult) -> str:
    return f"\n--- stdout ---\n{result.stdout.str()}\n--- stderr ---\n{result.stderr.str()}"


# -- the examples --------------------------------------------------------------------------


def test_the_documents_exist() -> None:
    names = {doc.relative_to(ROOT).as_posix() for doc in DOCUMENTS}
    assert {"README.md", "docs/index.md", "docs/usage.md", "docs/report.md"} <= names
    assert runnable_sections(), "no <!-- file: ... --> examples found"


@pytest.mark.parametrize("block", python_blocks(), ids=lambda b: b.where)
def test_python_block_compiles(block: Block) -> None:
    compile(block.source, block.where, "exec")


@pytest.mark.parametrize("section", runnable_sections(), ids=lambda s: s.id)
@pytest.mark.usefixtures("no_leaky_env")
def test_documented_example_runs(pytester: pytest.Pytester, section: Section) -> None:
    written: dict[str, Block] = {}
    for block in section.blocks:
        assert block.lang == "python", f"{block.where}: a file block must be ```python"
        assert block.file is not None
        previous = written.get(block.file)
        assert previous is None, f"{block.where}: {block.file} already written at {previous}"
        written[block.file] = block
        path = pytester.path / block.file
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(block.source, encoding="utf-8")

    result = run_inner(pytester)

    counts = outcomes(result)
    broken = counts.get("failed", 0) + counts.get("errors", 0)
    if any(block.expect == "failed" for block in section.blocks):
        assert broken >= 1, f"{section.id}: expected a failure{describe(result)}"
    else:
        assert result.ret == 0, f"{section.id}: exit code {result.ret}{describe(result)}"
        assert counts.get("passed", 0) >= 1, f"{section.id}: nothing passed{describe(result)}"
        assert broken == 0, f"{section.id}: {counts}{describe(result)}"


# -- the README's promises -----------------------------------------------------------------


def _bash_commands(title: str) -> list[list[str]]:
    blocks = []
    lines = section_of(ROOT / "README.md", title)
    i = 0
    while i < len(lines):
        if lines[i].startswith("```bash"):
            end = lines.index("```", i + 1)
            blocks.append([line for line in lines[i + 1 : end] if line.strip()])
            i = end
        i += 1
    return blocks


def test_readme_has_exactly_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert readme.count("```bash") == 2
    assert _bash_commands("Run the tests") == [[README_TEST_COMMAND]]
    [[demo]] = _bash_commands("Run the demo")
    assert demo.startswith("python3 -m venv .venv-demo && ")
    demo_dir = demo.rsplit(" ", 1)[1]
    assert demo_dir == DEMO_DIR
    # The demo is a rootdir of its own, so it runs from the repository root.
    assert (ROOT / demo_dir / "pytest.ini").is_file()


@pytest.mark.usefixtures("no_leaky_env")
def test_readme_options_table_matches_pytest_help(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_subprocess("--help", timeout=INNER_TIMEOUT)
    assert result.ret == 0, describe(result)
    text = result.stdout.str()
    flags = set(re.findall(r"(?<![\w-])(--(?:no-)?prewarm-[a-z-]+)", text))
    inis = set(re.findall(r"^\s+(prewarm_\w+) \(", text, re.MULTILINE))
    assert flags
    assert inis

    table = [line for line in section_of(ROOT / "README.md", "Options") if line.startswith("| `")]
    documented_flags: set[str] = set()
    documented_inis: set[str] = set()
    for row in table:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        documented_flags.update(re.findall(r"`(--[\w-]+)", cells[0]))
        documented_inis.update(re.findall(r"`(prewarm_\w+)`", cells[1]))
    assert documented_flags == flags
    assert documented_inis == inis


# -- the JSON report schema ----------------------------------------------------------------

_SCHEMA_SUITE = {
    "conftest.py": """
        import time

        import pytest


        def build_ok(path):
            time.sleep(0.2)
            (path / "data.txt").write_text("ok")
            return {"files": 1}


        def build_bad(path):
            raise RuntimeError("cannot build")


        @pytest.fixture(scope="session")
        def ok(prewarmed_template):
            return prewarmed_template("ok", build_ok)


        @pytest.fixture(scope="session")
        def bad(prewarmed_template):
            return prewarmed_template("bad", build_bad)


        def stop_svc(path, value):
            pass


        @pytest.fixture(scope="session")
        def svc(prewarmed_template):
            return prewarmed_template("svc", lambda path: 1, teardown=stop_svc)
    """,
    "test_schema.py": """
        def test_ok(ok):
            assert ok.value == {"files": 1}


        def test_bad(bad):
            pass


        def test_svc(svc):
            assert svc.value == 1
    """,
}


def _key_paths(value: Any, prefix: str = "") -> set[str]:
    """``{"a": [{"b": 1}]}`` gives ``{"a", "a[].b"}``; lists of scalars add nothing."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{prefix}.{key}" if prefix else key
            paths.add(path)
            paths |= _key_paths(item, path)
    elif isinstance(value, list):
        for item in value:
            paths |= _key_paths(item, f"{prefix}[]")
    return paths


def _documented_paths() -> set[str]:
    """Field paths named in the first column of the tables in docs/report.md."""
    text = (ROOT / "docs" / "report.md").read_text(encoding="utf-8")
    return set(re.findall(r"^\| `([a-z_]+(?:\[\])?(?:\.[a-z_]+(?:\[\])?)*)` \|", text, re.M))


@pytest.mark.usefixtures("no_leaky_env")
def test_json_report_fields_are_the_documented_ones(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(**{name.removesuffix(".py"): src for name, src in _SCHEMA_SUITE.items()})
    # --dist each: both workers ask for both templates, so there are builds, a failure,
    # and a wait or a recorded failure received from the other worker.
    result = run_inner(pytester, "--dist", "each", "--prewarm-json", "report.json")
    assert outcomes(result).get("errors", 0) >= 1, describe(result)
    report = json.loads((pytester.path / "report.json").read_text(encoding="utf-8"))

    assert report["schema_version"] == 1
    by_name = {t["name"]: t for t in report["templates"]}
    assert by_name["ok"]["outcome"] == "built"
    assert by_name["bad"]["outcome"] == "failed"
    assert by_name["bad"]["waits"], "the second worker should have received the failure"
    assert [t["outcome"] for t in report["teardowns"]] == ["ok"]
    produced = _key_paths(report)
    # "[]" alone names the array itself; its elements' fields are listed as "[].field".
    documented = {path.removesuffix("[]") for path in _documented_paths()}
    assert produced - documented == set(), "fields missing from docs/report.md"
    assert documented - produced == set(), "documented fields the report does not have"


# -- links ---------------------------------------------------------------------------------


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(doc: Path) -> set[str]:
    anchors = set()
    in_fence = False
    for line in doc.read_text(encoding="utf-8").splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
        elif not in_fence and line.startswith("#"):
            anchors.add(_slug(line.lstrip("#")))
    return anchors


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # an absolute URL
        path_part, _, anchor = target.partition("#")
        linked = (doc.parent / path_part).resolve() if path_part else doc
        assert linked.exists(), f"{doc.name}: link to missing {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{doc.name}: no heading for #{anchor}"
