"""The TemplateStore driven directly, in one process: build once, publish whole, fail once."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import threading
from pathlib import Path

import pytest
from conftest import fill_up

from pytest_prewarm import PrewarmBuildError, PrewarmTimeout, PrewarmUsageError, Template
from pytest_prewarm.exceptions import PrewarmLockError
from pytest_prewarm.lockdir import forget_run
from pytest_prewarm.names import canonical_key, file_stem, key_digest
from pytest_prewarm.registry import Registry
from pytest_prewarm.request import Request, TemplateStore, make_request


class Builder:
    """A builder that counts its calls and remembers what it was given."""

    def __init__(self, result=None, error: BaseException | None = None, files: int = 3):
        self.calls: list[Path] = []
        self.result = result
        self.error = error
        self.files = files
        self.seen_empty: list[bool] = []

    def __call__(self, path: Path):
        self.calls.append(path)
        self.seen_empty.append(not any(path.iterdir()))
        for i in range(self.files):
            (path / f"f{i}.txt").write_text(str(i) * (i + 1))
        if self.error is not None:
            raise self.error
        return self.result


def store(lock_dir: Path, *, run_id: str = "run-1", worker: str = "gw0", **kw) -> TemplateStore:
    return TemplateStore(lock_dir, run_id=run_id, worker=worker, **kw)


def request(build, name: str = "db", key=None, timeout: float = 10.0) -> Request:
    return Request(name, build, key, timeout)


def tid(name: str = "db", key=None) -> str:
    return f"{file_stem(name)}.{key_digest(canonical_key(key, name=name))}"


def test_the_builder_runs_once_and_fills_the_directory_every_process_gets(tmp_path):
    build = Builder(result={"port": 5432, "pair": (1, 2)})
    one = store(tmp_path)

    first = one.get(request(build))
    second = one.get(request(build))

    assert len(build.calls) == 1
    assert build.seen_empty == [True]
    assert build.calls[0].is_relative_to(tmp_path / "templates" / tid())
    assert build.calls[0] == first.path  # in place: the builder's directory is the template
    assert second is first
    assert first.origin == "built"
    assert first.value == {"port": 5432, "pair": [1, 2]}  # the JSON round trip
    assert first.built_by == "gw0"
    assert first.name == "db"


def test_a_published_template_is_a_whole_directory_with_its_meta(tmp_path):
    build = Builder(result="v", files=5)

    template = store(tmp_path).get(request(build, key={"schema": 3}))

    assert isinstance(template, os.PathLike)
    assert Path(os.fspath(template)) == template.path
    build_dir = template.path.parent
    assert build_dir.parent == tmp_path / "templates" / tid(key={"schema": 3})
    assert template.path.name == "data"
    assert sorted(p.name for p in template.path.iterdir()) == [f"f{i}.txt" for i in range(5)]
    assert (template / "f4.txt").read_text() == "44444"
    assert template.key == {"schema": 3}
    meta = json.loads((build_dir.parent / "meta.json").read_text())
    assert meta["build"] == build_dir.name
    assert meta["digest"].startswith("sha256:")
    assert meta["data_path"] == str(template.path)
    assert meta["name"] == "db"
    assert meta["value"] == "v"
    assert meta["built_by"] == "gw0"
    assert meta["run_id"] == "run-1"
    # The template's directory holds the publication and the one build it names: nothing else.
    assert sorted(p.name for p in build_dir.parent.iterdir()) == [build_dir.name, "meta.json"]
    assert sorted(p.name for p in build_dir.iterdir()) == ["data", "manifest"]
    assert "origin='built'" in repr(template)


def test_another_process_of_the_run_reuses_the_published_template(tmp_path):
    build = Builder(result=7)
    store(tmp_path, worker="gw0").get(request(build))

    again = store(tmp_path, worker="gw1").get(request(build))

    assert len(build.calls) == 1
    assert again.origin == "reused"
    assert again.value == 7
    assert again.built_by == "gw0"


def test_a_different_key_is_a_different_template(tmp_path):
    build = Builder()
    one = store(tmp_path)

    v1 = one.get(request(build, key="v1"))
    v2 = one.get(request(build, key="v2"))

    assert len(build.calls) == 2
    assert v1.path != v2.path


def test_rebuild_builds_again_once_per_run(tmp_path):
    build = Builder()
    store(tmp_path, run_id="earlier").get(request(build))

    fresh = store(tmp_path, run_id="now", rebuild=True).get(request(build))
    same_run = store(tmp_path, run_id="now", rebuild=True, worker="gw1").get(request(build))

    assert len(build.calls) == 2
    assert fresh.origin == "built"
    assert same_run.origin == "reused"
    assert same_run.path == fresh.path


def test_a_failed_build_is_raised_to_every_later_request_of_the_run_without_retrying(tmp_path):
    build = Builder(error=RuntimeError("no such table: users"))

    with pytest.raises(PrewarmBuildError) as first:
        store(tmp_path, worker="gw2").get(request(build))
    with pytest.raises(PrewarmBuildError) as same_process:
        store(tmp_path, worker="gw2").get(request(build))
    with pytest.raises(PrewarmBuildError) as other_process:
        store(tmp_path, worker="gw3").get(request(build))

    assert len(build.calls) == 1
    for error in (first.value, same_process.value, other_process.value):
        assert error.template == "db"
        assert error.exc_type == "RuntimeError"
        assert error.exc_message == "no such table: users"
        assert error.worker == "gw2"
        assert error.pid == os.getpid()
        assert "raise self.error" in error.traceback_text
        assert "building template 'db' failed in gw2" in str(error)
        assert "no such table: users" in str(error)
    assert not (tmp_path / "templates" / tid()).exists()  # nothing left, not even empty


def test_a_later_run_tries_a_failed_build_again(tmp_path):
    failing = Builder(error=RuntimeError("broken"))
    with pytest.raises(PrewarmBuildError):
        store(tmp_path, run_id="first").get(request(failing))
    fixed = Builder(result="fixed")

    template = store(tmp_path, run_id="second").get(request(fixed))

    assert template.value == "fixed"
    assert len(fixed.calls) == 1
    assert fixed.seen_empty == [True]


@pytest.mark.parametrize(
    ("result", "type_name"), [({1, 2}, "set"), (object(), "object"), (float("nan"), "float")]
)
def test_a_result_that_is_not_json_fails_the_build_naming_template_and_type(
    tmp_path, result, type_name
):
    build = Builder(result=result)

    with pytest.raises(PrewarmBuildError) as info:
        store(tmp_path).get(request(build))
    with pytest.raises(PrewarmBuildError):
        store(tmp_path, worker="gw1").get(request(build))

    message = info.value.exc_message
    assert f"builder of template 'db' returned {type_name}" in message
    assert "not JSON-serialisable" in message
    assert len(build.calls) == 1
    assert not (tmp_path / "templates" / tid()).exists()


def test_an_interrupted_build_leaves_no_failure_so_the_next_request_builds(tmp_path):
    interrupted = Builder(error=KeyboardInterrupt())

    with pytest.raises(KeyboardInterrupt):
        store(tmp_path).get(request(interrupted))
    retry = Builder(result="ok")
    template = store(tmp_path, worker="gw1").get(request(retry))

    assert template.value == "ok"
    assert retry.seen_empty == [True]
    # Only the retry's build is left, and the meta.json that publishes it.
    assert sorted(p.name for p in (tmp_path / "templates" / tid()).iterdir()) == [
        template.path.parent.name,
        "meta.json",
    ]
    assert not list((tmp_path / "failures").rglob("*.json"))


def test_bad_names_and_keys_are_refused_before_anything_is_written(tmp_path):
    one = store(tmp_path)
    before = sorted(tmp_path.rglob("*"))
    build = Builder()

    for bad in ("", "a\x00b", "x" * 201, 3):
        with pytest.raises(PrewarmUsageError):
            one.get(request(build, name=bad))
    with pytest.raises(PrewarmUsageError, match="key"):
        one.get(request(build, key=object()))

    assert build.calls == []
    assert sorted(tmp_path.rglob("*")) == before


def test_a_builder_asking_for_its_own_template_gets_a_usage_error_not_a_deadlock(tmp_path):
    one = store(tmp_path)

    def build(path):
        return one.get(request(build))

    with pytest.raises(PrewarmBuildError) as info:
        one.get(request(build))

    assert "must not request its own template" in info.value.exc_message


def test_a_second_store_times_out_while_another_holds_the_lock(tmp_path, wait_for):
    started, release = threading.Event(), threading.Event()

    def slow(path):
        started.set()
        assert release.wait(60), "the test never released the builder"
        return "slow"

    holder = store(tmp_path, worker="gw0")
    results: list[Template] = []
    thread = threading.Thread(target=lambda: results.append(holder.get(request(slow))))
    thread.start()
    try:
        assert started.wait(30)
        with pytest.raises(PrewarmTimeout) as info:
            store(tmp_path, worker="gw1").get(request(Builder(), timeout=0.3))
    finally:
        release.set()
        thread.join(30)

    error = info.value
    assert error.template == "db"
    assert error.lock_path == str(tmp_path / "locks" / f"{tid()}.lock")
    assert 0.3 <= error.waited < 10
    assert "gw0" in str(error)
    assert f"pid {os.getpid()}" in str(error)
    assert "alive" in str(error)
    assert results[0].value == "slow"


def test_errors_survive_pickling_across_processes():
    build_error = PrewarmBuildError("db", "RuntimeError", "boom", "Traceback...", "gw1", 42)
    timeout = PrewarmTimeout("timed out waiting for 'db'", "db", "/l/db.lock", 1.5)

    build_copy = pickle.loads(pickle.dumps(build_error))
    timeout_copy = pickle.loads(pickle.dumps(timeout))

    assert str(build_copy) == str(build_error)
    assert (build_copy.worker, build_copy.pid, build_copy.exc_message) == ("gw1", 42, "boom")
    assert str(timeout_copy) == str(timeout)
    assert (timeout_copy.template, timeout_copy.lock_path, timeout_copy.waited) == (
        "db",
        "/l/db.lock",
        1.5,
    )


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_the_store_creates_its_directories_owner_only(tmp_path):
    lock_dir = tmp_path / "locks-root"

    store(lock_dir)

    for sub in ("locks", "templates", "failures", "trash", "events"):
        assert (lock_dir / sub).stat().st_mode & 0o777 == 0o700


# -- requests made from a call ---------------------------------------------------------------


def make(build=None, timeout=None, registry=None, key=None, name="db"):
    return make_request(
        name,
        build,
        key,
        timeout,
        registry=registry or Registry(),
        default_timeout=1800.0,
        default_source="the default",
    )


@pytest.mark.parametrize(
    ("timeout", "words"),
    [
        (0, "timeout 0 for template 'db' must be a positive number of seconds"),
        (-1.5, "timeout -1.5 for template 'db' must be a positive number of seconds"),
        (True, "timeout True for template 'db' must be a positive number of seconds"),
        ("5", "timeout '5' for template 'db' must be a positive number of seconds"),
        (float("nan"), "timeout nan for template 'db' must be a positive number of seconds"),
        (1e10, "timeout 10000000000.0 for template 'db' is too large; the most is 1e+08 s"),
        (float("inf"), "timeout inf for template 'db' is too large; the most is 1e+08 s"),
    ],
)
def test_a_timeout_in_the_call_that_is_not_a_usable_number_is_refused(timeout, words):
    with pytest.raises(PrewarmUsageError) as info:
        make(Builder(), timeout=timeout)

    assert str(info.value).startswith(words)


def test_a_timeout_in_the_call_and_the_default_say_where_they_came_from():
    given = make(Builder(), timeout=5)
    default = make(Builder())

    assert (given.timeout, given.timeout_source) == (5.0, "timeout= in the call")
    assert (default.timeout, default.timeout_source) == (1800.0, "the default")
    assert "The timeout is 5 s (from timeout= in the call)" in given.timeout_hint


def test_a_builder_that_is_not_callable_is_refused_naming_it():
    with pytest.raises(PrewarmUsageError) as info:
        make("nope")

    assert str(info.value) == "build for template 'db' is not callable: 'nope'"


def test_a_registered_builder_brings_its_key_unless_the_call_names_one():
    registry = Registry()
    build = Builder()
    registry.add("db", build, key={"schema": 1})

    assert make(registry=registry).key == {"schema": 1}
    assert make(registry=registry, key="mine").key == "mine"
    assert make(registry=registry).build is build


# -- the lock dir and the published template --------------------------------------------------


def test_a_template_published_in_another_boot_without_a_digest_is_rebuilt(tmp_path):
    build = Builder(result="v")
    store(tmp_path).get(request(build))
    meta = tmp_path / "templates" / tid() / "meta.json"
    doc = json.loads(meta.read_text())
    doc["boot_id"] = "an-earlier-boot"  # its data may be torn: nothing was fsynced
    doc["digest"] = None  # and nothing to verify it against (tests/test_templates_in_place.py)
    meta.write_text(json.dumps(doc))

    again = store(tmp_path, run_id="run-2").get(request(build))

    assert len(build.calls) == 2
    assert again.origin == "built"
    assert json.loads(meta.read_text())["boot_id"] != "an-earlier-boot"


def test_a_lock_dir_removed_under_a_run_is_a_lock_error_in_words(tmp_path):
    one = store(tmp_path / "lock-dir")
    shutil.rmtree(tmp_path / "lock-dir")
    build = Builder()

    with pytest.raises(PrewarmLockError) as info:
        one.get(request(build))

    assert str(info.value).startswith(
        f"template 'db': the lock dir {tmp_path / 'lock-dir'} failed: No such file or directory"
    )
    assert "Check that it exists and is writable, or use another --prewarm-lock-dir" in str(
        info.value
    )
    assert build.calls == []


def test_forgetting_a_run_removes_its_failure_records_only(tmp_path):
    failing = Builder(error=RuntimeError("boom"))
    for name in ("a", "b"):
        with pytest.raises(PrewarmBuildError):
            store(tmp_path).get(request(failing, name=name))
    with pytest.raises(PrewarmBuildError):
        store(tmp_path, run_id="other-run").get(request(failing, name="c"))
    planted = tmp_path / "failures" / tid("d") / "run-1.json"
    planted.mkdir(parents=True)  # not a record: it cannot be unlinked, and is left alone

    forget_run(tmp_path, "run-1")  # what the end of a run sharing the lock dir does

    failures = tmp_path / "failures"
    remaining = sorted(p.relative_to(failures) for p in failures.rglob("*.json"))
    assert remaining == [Path(tid("c"), "other-run.json"), Path(tid("d"), "run-1.json")]


def test_a_thread_waiting_for_another_thread_of_its_process_times_out_naming_it(tmp_path):
    started, release = threading.Event(), threading.Event()

    def slow(path):
        started.set()
        assert release.wait(60), "the test never released the builder"
        return "slow"

    one = store(tmp_path)
    builder = threading.Thread(target=one.get, args=(request(slow),))
    builder.start()
    try:
        assert started.wait(30)
        with pytest.raises(PrewarmTimeout) as info:
            one.get(request(Builder(), timeout=0.2))
    finally:
        release.set()
        builder.join(30)

    assert f"another thread of this process (gw0, pid {os.getpid()}) is building it" in str(
        info.value
    )
    assert info.value.waited == 0.2
    assert one.get(request(slow)).value == "slow"


def test_a_template_that_cannot_be_published_on_a_full_disk_fails_once_for_the_run(small_tmpfs):
    # The builder itself succeeds, leaving the disk full; meta.json, which holds the value
    # (10 kB, more than the page the discarded build log frees), then cannot be written.
    def fill_then_succeed(path):
        fill_up(path)
        return ["x" * 100] * 100

    with pytest.raises(PrewarmBuildError) as info:
        store(small_tmpfs / "locks").get(request(fill_then_succeed))
    again = Builder()
    with pytest.raises(PrewarmBuildError) as second:
        store(small_tmpfs / "locks", worker="gw1").get(request(again))

    assert "No space left on device" in info.value.exc_message
    assert f"the filesystem holding the lock dir {small_tmpfs / 'locks'} is full" in (
        info.value.exc_message
    )
    assert again.calls == []  # the failure is recorded: the rest of the run fails fast
    assert str(second.value).splitlines()[0] == str(info.value).splitlines()[0]
    assert not (small_tmpfs / "locks" / "templates" / tid()).exists()


def test_a_value_refused_after_the_build_printed_keeps_a_log_without_a_traceback(tmp_path):
    def chatty(path):
        print("building the schema")
        return {1, 2}

    with pytest.raises(PrewarmBuildError) as info:
        store(tmp_path).get(request(chatty))

    log = Path(info.value.log_path).read_text()
    assert "building the schema" in log
    assert "returned set {1, 2}, which is not JSON-serialisable" in log
    assert "Traceback" not in log
    assert info.value.traceback_text == ""


def test_a_store_refuses_a_lock_mode_that_has_no_implementation(tmp_path):
    # "auto" is resolved to flock or lease before any store exists (lockdir.choose_lock_mode).
    with pytest.raises(ValueError, match=r"no lock implementation for mode <LockMode\.AUTO"):
        store(tmp_path, lock_mode="auto")
