"""Templates that fit real builds, driven through the store in this process.

In place (the builder's directory is the template's), verified when restored from another
boot, supplied from outside, configured in every process, built on other templates.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from pathlib import Path

import pytest

from pytest_prewarm import (
    PrewarmConfigureError,
    PrewarmUsageError,
    PrewarmWarning,
    Template,
)
from pytest_prewarm.digest import digest_of, first_difference, manifest
from pytest_prewarm.layout import Layout, template_id
from pytest_prewarm.names import canonical_key
from pytest_prewarm.registry import Registry
from pytest_prewarm.request import Request, TemplateStore, make_request
from pytest_prewarm.supply import Supplied, parse


class Builder:
    """Writes a few files, counts its calls, returns its own path (what an in-place one does)."""

    def __init__(self, content: str = "v1") -> None:
        self.calls: list[Path] = []
        self.content = content

    def __call__(self, path: Path, layers: dict[str, Template] | None = None) -> dict[str, str]:
        self.calls.append(path)
        (path / "sub").mkdir()
        (path / "sub" / "data.txt").write_text(self.content)
        (path / "tool").write_text("#!/bin/sh\n")
        (path / "tool").chmod(0o755)
        (path / "link").symlink_to("sub/data.txt")
        on = {name: str(t.path) for name, t in (layers or {}).items()}
        return {"home": str(path), "on": json.dumps(on, sort_keys=True)}


def store(lock_dir: Path, *, run_id: str = "run-1", worker: str = "gw0", **kw) -> TemplateStore:
    return TemplateStore(lock_dir, run_id=run_id, worker=worker, **kw)


def request(build, name: str = "db", key=None, **kw) -> Request:
    return Request(name, build, key, 10.0, **kw)


def meta_path(lock_dir: Path, name: str = "db", key=None) -> Path:
    return Layout(lock_dir).meta_file(template_id(name, canonical_key(key, name=name)))


def as_if_restored_elsewhere(lock_dir: Path) -> None:
    """What a lock dir restored from a CI cache onto another machine looks like: the same
    files, published in another boot."""
    for meta in (lock_dir / "templates").glob("*/meta.json"):
        data = json.loads(meta.read_text())
        data["boot_id"] = "another-machine-boot-id"
        meta.write_text(json.dumps(data))


def test_the_builder_fills_the_directory_every_process_gets(tmp_path):
    build = Builder()

    built = store(tmp_path, worker="gw0").get(request(build))
    reused = store(tmp_path, worker="gw1").get(request(build))

    assert build.calls == [built.path] == [reused.path]
    assert built.value["home"] == str(built.path)  # a path recorded by the build stays true
    assert (reused.path / "link").read_text() == "v1"
    assert reused.digest == built.digest is not None


def test_a_template_restored_from_another_boot_is_verified_and_reused(tmp_path):
    build = Builder()
    first = store(tmp_path, run_id="ci-1").get(request(build))
    as_if_restored_elsewhere(tmp_path)
    events = []

    fresh = store(tmp_path, run_id="ci-2")
    fresh.on_event = events.append
    again = fresh.get(request(build))
    other = store(tmp_path, run_id="ci-2", worker="gw1").get(request(build))

    assert len(build.calls) == 1
    assert again.path == first.path
    assert again.origin == other.origin == "reused"
    (event,) = events
    assert event.outcome == "reused"
    assert event.note is not None
    assert event.note.startswith("restored from another boot, verified in ")
    # Published again for this boot: the next process reuses it without verifying again.
    assert json.loads(meta_path(tmp_path).read_text())["boot_id"] == fresh.boot_id


@pytest.mark.parametrize(
    ("tamper", "expected"),
    [
        (lambda d: (d / "sub" / "data.txt").write_text("tampered"), "sub/data.txt changed"),
        (lambda d: (d / "sub" / "data.txt").unlink(), "sub/data.txt is missing"),
        (lambda d: (d / "extra").write_text("x"), "extra was added"),
        (lambda d: (d / "tool").chmod(0o644), "tool changed"),
        (lambda d: (d / "manifest").write_text("f forged\n"), "its manifest does not match"),
    ],
    ids=["content", "missing", "added", "mode", "manifest"],
)
def test_a_restored_template_that_does_not_verify_is_built_again_saying_why(
    tmp_path, tamper, expected
):
    build = Builder()
    first = store(tmp_path, run_id="ci-1").get(request(build))
    as_if_restored_elsewhere(tmp_path)
    tamper(first.path.parent if expected.endswith("match") else first.path)
    events = []

    fresh = store(tmp_path, run_id="ci-2")
    fresh.on_event = events.append
    again = fresh.get(request(build))

    assert len(build.calls) == 2
    assert again.origin == "built"
    assert again.path != first.path
    (event,) = events
    assert expected in (event.note or "")
    # The superseded build is moved aside: the template dir holds the new build only.
    siblings = sorted(p.name for p in again.path.parent.parent.iterdir())
    assert siblings == sorted([again.path.parent.name, "meta.json"])


def test_a_lock_dir_restored_to_another_path_is_built_again_saying_why(tmp_path):
    build = Builder()
    store(tmp_path / "a", run_id="ci-1").get(request(build))
    shutil.copytree(tmp_path / "a", tmp_path / "b", symlinks=True)
    as_if_restored_elsewhere(tmp_path / "b")
    events = []

    moved = store(tmp_path / "b", run_id="ci-2")
    moved.on_event = events.append
    again = moved.get(request(build))

    assert len(build.calls) == 2
    assert again.value["home"] == str(again.path)
    assert again.path.is_relative_to(tmp_path / "b")
    assert "restored to another path" in (events[0].note or "")


def test_a_template_published_by_version_0_1_is_still_used_in_its_boot(tmp_path):
    build = Builder()
    tid = template_id("db", canonical_key(None, name="db"))
    old = tmp_path / "templates" / tid
    (old / "data").mkdir(parents=True)
    (old / "data" / "old.txt").write_text("from 0.1")
    current = store(tmp_path)
    (old / "meta.json").write_text(
        json.dumps(
            {
                "format": 1,
                "name": "db",
                "key": canonical_key(None, name="db"),
                "value": "old",
                "built_by": "gw3",
                "pid": 1,
                "run_id": "old-run",
                "boot_id": current.boot_id,
                "build_seconds": 1.0,
                "published_at": 1.0,
                "holder": None,
            }
        )
    )

    reused = current.get(request(build))
    as_if_restored_elsewhere(tmp_path)
    rebuilt = store(tmp_path, run_id="run-2").get(request(build))

    assert reused.path == old / "data"
    assert reused.value == "old"
    assert rebuilt.origin == "built"
    assert len(build.calls) == 1
    assert not (old / "data").exists()  # the 0.1 data was superseded and moved aside


def test_the_manifest_records_links_modes_and_contents_and_names_the_first_difference(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    Builder()(data)
    (data / "odd name\nwith newline").write_text("x")
    before = manifest(data)
    (data / "sub" / "data.txt").write_text("v2")

    after = manifest(data)

    assert "l link -> sub/data.txt" in before
    assert any(line.startswith("f tool x 10 ") for line in before.splitlines())
    assert len(before.splitlines()) == 5  # one line per entry, whatever a name holds
    expected = hashlib.sha256(before.encode()).hexdigest()
    assert digest_of(before) == f"sha256:{expected}"
    assert first_difference(before, after) == "sub/data.txt changed"
    assert first_difference(before, before) == "the manifest was changed"


# -- supplied templates ------------------------------------------------------------------------


def tree_checksum(path: Path) -> str:
    return digest_of(manifest(path)) + str(sorted(os.lstat(p).st_mtime_ns for p in path.rglob("*")))


def test_a_supplied_directory_is_used_as_it_is_and_never_built_or_touched(tmp_path):
    given = tmp_path / "prebuilt"
    given.mkdir()
    (given / "app.whl").write_text("wheel")
    before = tree_checksum(given)
    build = Builder()
    events = []
    supplied = {"wheel": Supplied("wheel", given, "--prewarm-supply")}
    one = store(tmp_path / "locks", supplied=supplied)
    one.on_event = events.append

    template = one.get(request(build, name="wheel", key="any key"))
    again = one.get(request(build, name="wheel", key="any key"))

    assert build.calls == []
    assert again is template
    assert template.path == given
    assert (template.origin, template.built_by, template.value) == ("supplied", "supplied", None)
    (event,) = events
    assert (event.outcome, event.built_by) == ("supplied", f"{given} (from --prewarm-supply)")
    assert tree_checksum(given) == before
    assert not (tmp_path / "locks" / "templates" / "wheel").exists()


def test_supply_specs_are_checked_and_the_first_source_wins(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "file").write_text("")

    found = parse([("db=a", "--prewarm-supply"), ("db=b", "PYTEST_PREWARM_SUPPLY")], tmp_path)

    assert found["db"].path == tmp_path / "a"
    assert found["db"].source == "--prewarm-supply"
    for spec, message in [
        ("db", "is not NAME=DIR"),
        ("=a", "is not NAME=DIR"),
        ("db=missing", "does not exist"),
        ("db=file", "is not a directory"),
        ("\x00=a", "NUL"),
    ]:
        with pytest.raises(PrewarmUsageError, match=message) as info:
            parse([(spec, "ini prewarm_supply in tox.ini")], tmp_path)
        assert "from ini prewarm_supply in tox.ini" in str(info.value)


# -- build once, configure every process --------------------------------------------------------


def test_configure_runs_once_in_every_process_that_gets_the_template(tmp_path):
    seen: list[tuple[str, str]] = []

    def configure(template: Template) -> None:
        seen.append((template.origin, str(template.path)))

    build = Builder()
    builder = store(tmp_path, worker="gw0")
    first = builder.get(request(build, configure=configure))
    builder.get(request(build, configure=configure))  # cached: not configured again
    waiter = store(tmp_path, worker="gw1")
    waiter.get(request(build, configure=configure))

    assert seen == [("built", str(first.path)), ("reused", str(first.path))]


def test_a_failing_configure_hook_fails_that_process_once_and_names_the_hook(tmp_path):
    calls = []

    def configure(template: Template) -> None:
        calls.append(template.name)
        raise ConnectionRefusedError("no server on port 5432")

    one = store(tmp_path, worker="gw2")
    with pytest.raises(PrewarmConfigureError) as first:
        one.get(request(Builder(), configure=configure))
    with pytest.raises(PrewarmConfigureError) as second:
        one.get(request(Builder(), configure=configure))

    assert calls == ["db"]
    assert str(first.value) == str(second.value)
    assert "configure hook of template 'db' failed in gw2" in str(first.value)
    assert "ConnectionRefusedError: no server on port 5432" in str(first.value)
    assert isinstance(first.value.__cause__, ConnectionRefusedError)


def test_a_builder_that_configures_its_own_process_is_warned_about_the_others(
    tmp_path, monkeypatch
):
    monkeypatch.delenv("APP_DSN", raising=False)

    def build(path: Path) -> str:
        os.environ["APP_DSN"] = f"sqlite:///{path}/app.db"
        return "ok"

    with pytest.warns(PrewarmWarning, match=r"changed this process's environment \(APP_DSN\)"):
        store(tmp_path / "one").get(request(build))
    monkeypatch.delenv("APP_DSN")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # with configure= the warning is not given
        store(tmp_path / "two").get(request(build, configure=lambda t: None))


# -- composed templates -------------------------------------------------------------------------


def test_a_changed_layer_rebuilds_the_templates_built_on_it_and_nothing_else(tmp_path):
    base_v1, base_v2, app, other = Builder("base 1"), Builder("base 2"), Builder(), Builder()

    def run(base_build: Builder, base_key: str, run_id: str) -> Template:
        one = store(tmp_path, run_id=run_id)
        base = one.get(request(base_build, name="base", key=base_key))
        one.get(request(other, name="other"))
        return one.get(request(app, name="app", requires=(base,)))

    first = run(base_v1, "1", "run-1")
    same = run(base_v1, "1", "run-2")
    changed = run(base_v2, "2", "run-3")

    calls = [len(b.calls) for b in (base_v1, base_v2, app, other)]
    assert calls == [1, 1, 2, 1]
    assert same.path == first.path
    assert changed.path != first.path
    assert json.loads(changed.value["on"])["base"] == str(base_v2.calls[0])
    meta = json.loads((changed.path.parent.parent / "meta.json").read_text())
    assert list(meta["requires"]) == ["base"]


def test_registered_layers_are_resolved_and_a_cycle_is_a_clear_error(tmp_path):
    registry = Registry()
    base, app = Builder("base"), Builder()
    registry.add("base", base)
    registry.add("app", app, requires=("base",))
    registry.add("a", Builder(), requires=("b",))
    registry.add("b", Builder(), requires=("a",))

    def make(name: str) -> Request:
        return make_request(
            name, None, None, None, registry=registry, default_timeout=5, default_source="t"
        )

    template = store(tmp_path).get(make("app"))

    assert json.loads(template.value["on"]) == {"base": str(base.calls[0])}
    with pytest.raises(PrewarmUsageError, match=r"cycle: 'a' -> 'b' -> 'a'"):
        make("a")


def test_a_builder_with_layers_must_take_them(tmp_path):
    base = store(tmp_path).get(request(Builder(), name="base"))

    def one_argument(path: Path) -> None:
        return None

    with pytest.raises(PrewarmUsageError, match=r"called as build\(path, layers\)"):
        make_request(
            "app",
            one_argument,
            None,
            None,
            registry=Registry(),
            default_timeout=5,
            default_source="t",
            requires=[base],
        )
    with pytest.raises(PrewarmUsageError, match="give Template objects"):
        make_request(
            "app",
            Builder(),
            None,
            None,
            registry=Registry(),
            default_timeout=5,
            default_source="t",
            requires=[42],
        )


@pytest.mark.parametrize("planted", ["../../victim", "data", "", "meta.json", 7])
def test_a_meta_json_naming_a_build_outside_its_shape_is_not_used(tmp_path, planted):
    build = Builder()
    first = store(tmp_path / "locks").get(request(build))
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "data").mkdir()
    (victim / "data" / "precious.txt").write_text("mine")
    meta = meta_path(tmp_path / "locks")
    doc = json.loads(meta.read_text())
    doc["build"] = planted  # format 2 with a name that is not <pid>-<8 hex>
    meta.write_text(json.dumps(doc))

    again = store(tmp_path / "locks", run_id="run-2").get(request(build))

    assert len(build.calls) == 2  # not served: built again, over the unusable record
    assert again.path.is_relative_to(first.path.parent.parent)
    assert (victim / "data" / "precious.txt").read_text() == "mine"
    assert json.loads(meta.read_text())["build"] == again.path.parent.name


def test_a_builder_that_moves_its_process_elsewhere_is_warned_too(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", list(__import__("sys").path))

    def build(path: Path) -> None:
        os.chdir(path)
        __import__("sys").path.insert(0, str(path))

    with pytest.warns(PrewarmWarning, match=r"working directory and sys\.path"):
        store(tmp_path / "locks").get(request(build))


def test_bad_configure_and_a_single_layer_name_in_a_request(tmp_path):
    registry = Registry()
    base = Builder("base")
    registry.add("base", base)

    def make(**kw):
        return make_request(
            "app", Builder(), None, None, registry=registry, default_timeout=5,
            default_source="t", **kw,
        )  # fmt: skip

    with pytest.raises(PrewarmUsageError, match="configure= for template 'app' is not callable"):
        make(configure="setup_env")
    with pytest.raises(PrewarmUsageError, match="configure= for template 'x' is not callable"):
        registry.add("x", Builder(), configure=42)
    with pytest.raises(PrewarmUsageError, match="give the names of registered templates"):
        registry.add("y", Builder(), requires=(Builder(),))
    single = make(requires="base")  # one name, not a sequence of its letters
    template = store(tmp_path).get(single)
    assert json.loads(template.value["on"]) == {"base": str(base.calls[0])}


@pytest.mark.parametrize("kind", ["fifo", "symlink", "directory"])
def test_a_manifest_that_is_not_a_file_of_ours_is_not_read_and_the_template_is_built_again(
    tmp_path, kind
):
    build = Builder()
    first = store(tmp_path / "locks", run_id="ci-1").get(request(build))
    as_if_restored_elsewhere(tmp_path / "locks")
    victim = tmp_path / "victim.txt"
    genuine = manifest(first.path)
    victim.write_text(genuine)  # a manifest that would verify, if it were followed
    planted = first.path.parent / "manifest"
    planted.unlink()
    if kind == "fifo":
        os.mkfifo(planted)  # opened for reading, it would block for ever
    elif kind == "symlink":
        planted.symlink_to(victim)
    else:
        planted.mkdir()
    events = []

    fresh = store(tmp_path / "locks", run_id="ci-2")
    fresh.on_event = events.append
    again = fresh.get(request(build))

    assert len(build.calls) == 2
    assert again.origin == "built"
    assert "its manifest does not match its digest" in (events[0].note or "")
    assert victim.read_text() == genuine  # outside the lock dir: read by nobody, unchanged
