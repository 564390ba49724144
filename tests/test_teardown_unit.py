"""teardown.py and reaper.py driven directly: names, records, claims, users, the watcher's end."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest

from pytest_prewarm import reaper, report, services, teardown
from pytest_prewarm.exceptions import PrewarmUsageError
from pytest_prewarm.layout import Layout
from pytest_prewarm.liveness import own_record
from pytest_prewarm.owner import OwnerRecord
from pytest_prewarm.records import Meta

calls: list[tuple[Path, Any]] = []


def stop_recorded(path: Path, value: Any) -> None:
    calls.append((path, value))


def stop_raising(path: Path, value: Any) -> None:
    raise RuntimeError("the server refused to stop")


class Holder:
    def method(self, path: Path, value: Any) -> None:
        pass

    @staticmethod
    def static(path: Path, value: Any) -> None:
        pass


def dead_record(run_id: str) -> OwnerRecord:
    """The owner record of a process that has exited since (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    record = own_record("controller", run_id, proc.pid)
    proc.kill()
    proc.wait()
    return record


BUILD = "4242-0badc0de"  # the build directory a published template names


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    lay = Layout(tmp_path / "lock-dir")
    lay.ensure()
    return lay


def built(layout: Layout, run_id: str, controller: OwnerRecord, value: Any = 1) -> Any:
    ref = teardown.reference(stop_recorded, "svc")
    data = layout.data_dir("svc.0", BUILD)
    instance = teardown.record_building(
        layout,
        template="svc",
        tid="svc.0",
        run_id=run_id,
        worker="gw0",
        path=data,
        ref=ref,
        controller=controller,
    )
    teardown.record_built(layout, instance, data, value)
    return instance


# -- finding a teardown by name ----------------------------------------------------------------


def test_a_module_level_function_is_referenced_by_module_name_and_file() -> None:
    ref = teardown.reference(stop_recorded, "t")

    assert (ref.module, ref.qualname) == (__name__, "stop_recorded")
    assert ref.file == __file__
    assert teardown.resolve(ref, []) is stop_recorded
    assert teardown.reference(Holder.static, "t").qualname == "Holder.static"


@pytest.mark.parametrize(
    ("func", "words"),
    [
        (lambda path, value: None, "is a lambda or a function defined inside another one"),
        (Holder().method, "is not what that name refers to"),
        (functools.partial(stop_recorded), "has no module and name"),
        ("stop", "is not callable"),
    ],
    ids=["lambda", "bound-method", "partial", "not-callable"],
)
def test_a_teardown_no_other_process_can_import_is_refused(func: Any, words: str) -> None:
    with pytest.raises(PrewarmUsageError, match=words) as caught:
        teardown.reference(func, "db")

    assert "'db'" in str(caught.value)


def test_a_nested_function_is_refused_too() -> None:
    def stop(path: Path, value: Any) -> None:
        pass

    with pytest.raises(PrewarmUsageError, match=r"<locals>\.stop for template 'db' is a lambda"):
        teardown.reference(stop, "db")


def test_a_teardown_is_imported_from_the_builders_sys_path(tmp_path: Path) -> None:
    name = f"stops_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text("def stop(path, value):\n    return ('stopped', value)\n")
    ref = teardown.TeardownRef(name, "stop", str(tmp_path / f"{name}.py"))

    try:
        func = teardown.resolve(ref, [str(tmp_path)])
        assert func(tmp_path, 3) == ("stopped", 3)
    finally:
        sys.modules.pop(name, None)
        sys.path.remove(str(tmp_path))


def test_a_teardown_whose_module_has_no_importable_name_is_loaded_from_its_file(
    tmp_path: Path,
) -> None:
    # pytest's importlib mode names modules in ways no sys.path entry resolves.
    file = tmp_path / "conftest.py"
    file.write_text("def stop(path, value):\n    return 'from the file'\n")
    name = f"tests.x{uuid.uuid4().hex[:8]}.conftest"
    ref = teardown.TeardownRef(name, "stop", str(file))

    try:
        assert teardown.resolve(ref, [])(tmp_path, None) == "from the file"
    finally:
        sys.modules.pop(name, None)


def test_a_teardown_that_cannot_be_found_says_why(tmp_path: Path) -> None:
    missing = teardown.TeardownRef(f"gone_{uuid.uuid4().hex[:8]}", "stop", None)
    with pytest.raises(teardown.TeardownError, match="cannot import gone_"):
        teardown.resolve(missing, [])
    with pytest.raises(teardown.TeardownError, match="was not found in module"):
        teardown.resolve(teardown.TeardownRef(__name__, "no_such_function", None), [])
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('half-installed')\n")
    name = f"broken_{uuid.uuid4().hex[:8]}"
    with pytest.raises(teardown.TeardownError, match=r"importing .*broken\.py .* failed"):
        teardown.resolve(teardown.TeardownRef(name, "stop", str(broken)), [])
    assert name not in sys.modules


# -- records -------------------------------------------------------------------------------


def test_an_instance_record_round_trips_and_anything_else_reads_as_none(
    layout: Layout, tmp_path: Path
) -> None:
    me = own_record("controller", "run-1")
    instance = built(layout, "run-1", me, value={"port": 5432})
    path = layout.service_record("svc.0", instance.instance)

    assert teardown.Instance.read(path) == instance
    data = json.loads(path.read_text())
    for field, bad in [
        ("format", 99),
        ("pid", "1"),
        ("teardown", "x"),
        ("built", "yes"),
        ("started", {}),
        ("template", None),
    ]:
        path.write_text(json.dumps({**data, field: bad}))
        assert teardown.Instance.read(path) is None, field
    path.write_text(json.dumps({**data, "teardown": {"module": 1, "qualname": "x"}}))
    assert teardown.Instance.read(path) is None


# -- the end of a run ------------------------------------------------------------------------


def test_the_last_user_tears_down_once_and_unpublishes(layout: Layout) -> None:
    calls.clear()
    me = own_record("controller", "run-1")
    instance = built(layout, "run-1", me, value={"port": 1})
    meta = Meta(
        "svc", "null", {"port": 1}, "gw0", os.getpid(), "run-1", None, 0.1, 0.0, None, build=BUILD
    )
    layout.data_dir("svc.0", BUILD).mkdir(parents=True)
    layout.meta_file("svc.0").write_text(meta.to_json())

    [result] = teardown.finish(layout, "run-1", runner=me, timeout=5)

    assert (result.template, result.outcome, result.unfinished) == ("svc", "ok", False)
    assert calls == [(Path(instance.path), {"port": 1})]
    assert not layout.meta_file("svc.0").exists()  # unpublished, then its build moved aside
    assert not layout.build_dir("svc.0", BUILD).exists()
    assert teardown.finish(layout, "run-1", runner=me, timeout=5) == []
    assert not layout.service_dir("svc.0").exists()


def test_a_run_never_tears_down_what_another_run_built_and_it_never_used(
    layout: Layout,
) -> None:
    built(layout, "run-1", own_record("controller", "run-1"))

    assert teardown.finish(layout, "run-2", runner=own_record("c", "run-2"), timeout=5) == []
    assert layout.service_records()


def test_a_live_user_keeps_the_service_and_a_dead_one_does_not(layout: Layout) -> None:
    calls.clear()
    me = own_record("controller", "run-1")
    instance = built(layout, "run-1", me)
    other = own_record("controller", "run-2")  # this process: alive
    teardown._join(layout, instance, other)

    assert teardown.finish(layout, "run-1", runner=me, timeout=5) == []
    assert calls == []

    dead = dead_record("run-3")
    teardown._join(layout, instance, dead)
    [result] = teardown.finish(layout, "run-2", runner=other, timeout=5)
    assert result.outcome == "ok"
    assert len(calls) == 1


def test_a_claim_of_a_dead_claimer_is_taken_over_and_a_live_ones_is_left(
    layout: Layout,
) -> None:
    me = own_record("controller", "run-1")
    instance = built(layout, "run-1", me)
    claim = layout.service_claim("svc.0", instance.instance)
    claim.write_text(me.to_json())  # a live claimer: this very process

    assert teardown.finish(layout, "run-1", runner=me, timeout=5) == []

    teardown._join(layout, instance, me)
    claim.write_text(dead_record("run-1").to_json())
    [result] = teardown.finish(layout, "run-1", runner=me, timeout=5)
    assert result.outcome == "ok"
    assert not claim.exists()


def test_a_failing_a_hanging_and_a_lost_teardown_are_results(layout: Layout) -> None:
    assert teardown.call(stop_raising, Path("."), None, 5)[0] == "failed"
    assert "RuntimeError: the server refused to stop" in str(
        teardown.call(stop_raising, Path("."), None, 5)[1]
    )
    import threading

    release = threading.Event()

    def hang(path: Path, value: Any) -> None:
        release.wait(30)

    try:
        assert teardown.call(hang, Path("."), None, 0.05) == (
            "timeout",
            "still running after 0.05 s (see --prewarm-teardown-timeout)",
        )
    finally:
        release.set()
    me = own_record("controller", "run-1")
    instance = built(layout, "run-1", me)
    record = layout.service_record("svc.0", instance.instance)
    data = json.loads(record.read_text())
    data["teardown"]["qualname"] = "no_such_function"
    record.write_text(json.dumps(data))
    [result] = teardown.finish(layout, "run-1", runner=me, timeout=5)
    assert result.outcome == "failed"
    assert "no_such_function was not found" in str(result.error)


def test_an_unfinished_build_has_the_services_it_started_stopped(
    layout: Layout, tmp_path: Path
) -> None:
    me = own_record("controller", "run-1")
    instance = teardown.record_building(
        layout,
        template="svc",
        tid="svc.0",
        run_id="run-1",
        worker="gw0",
        path=tmp_path,
        ref=teardown.reference(stop_recorded, "svc"),
        controller=me,
    )
    code = "import time; time.sleep(60)"
    with services.reporting_to(lambda v: teardown.add_started(layout, instance, v)):
        value = services.start([sys.executable, "-c", code], tmp_path)

    [result] = teardown.finish(layout, "run-1", runner=me, timeout=10)

    assert result.unfinished
    assert result.outcome == "ok"
    assert services.stop(value) is False  # already stopped


def test_joining_another_runs_service(layout: Layout) -> None:
    builder = own_record("controller", "run-1")
    instance = built(layout, "run-1", builder)
    meta = Meta("svc", "null", 1, "gw0", instance.pid, "run-1", None, 0.1, 5.0, None, build=BUILD)
    joiner = own_record("controller", "run-2")

    assert teardown.join(layout, "svc.0", joiner, meta, timeout=5) is True
    assert layout.service_user("svc.0", instance.instance, "run-2").exists()

    # Claimed by its last user and gone meanwhile: the joiner must build afresh.
    layout.service_claim("svc.0", instance.instance).write_text(builder.to_json())
    assert teardown.join(layout, "svc.0", joiner, meta, timeout=0.05) is False
    assert not layout.service_user("svc.0", instance.instance, "run-2").exists()

    # No record: built without a teardown (meta.json unchanged), or torn down just now.
    empty = Layout(layout.root.parent / "other")
    empty.ensure()
    empty.template_dir("svc.0").mkdir()
    assert teardown.join(empty, "svc.0", joiner, meta, timeout=5) is False
    empty.meta_file("svc.0").write_text(meta.to_json())
    assert teardown.join(empty, "svc.0", joiner, meta, timeout=5) is None


# -- the watcher -----------------------------------------------------------------------------


def test_the_watcher_ends_a_dead_runs_services_and_only_once(layout: Layout) -> None:
    calls.clear()
    controller = dead_record("run-1")
    built(layout, "run-1", controller)
    argv = [str(layout.root), "run-1", controller.to_json(), "5"]

    assert reaper.main(argv) == 0
    assert len(calls) == 1
    assert reaper.main(argv) == 0
    assert len(calls) == 1
    assert reaper.main([str(layout.root), "run-1", "not json", "5"]) == 2


def test_the_watcher_reports_a_failed_teardown_with_its_exit_status(layout: Layout) -> None:
    controller = dead_record("run-1")
    instance = built(layout, "run-1", controller)
    record = layout.service_record("svc.0", instance.instance)
    data = json.loads(record.read_text())
    data["teardown"]["qualname"] = "stop_raising"
    record.write_text(json.dumps(data))

    assert reaper.main([str(layout.root), "run-1", controller.to_json(), "5"]) == 1


def test_the_watcher_is_started_once_per_run_and_exits_after_the_controller(
    layout: Layout, tmp_path: Path
) -> None:
    code = "import time; time.sleep(60)"
    controller_proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        controller = own_record("controller", "run-1", controller_proc.pid)
        assert reaper.ensure_running(layout, "run-1", controller, 5) is True
        assert reaper.ensure_running(layout, "run-1", controller, 5) is False
        watcher = reaper._STARTED[-1]
        assert watcher.poll() is None  # waiting for the controller
        assert os.getsid(watcher.pid) != os.getsid(0)
    finally:
        controller_proc.kill()
        controller_proc.wait()
    assert watcher.wait(timeout=30) == 0
    assert not layout.reaper_marker("run-1").exists()


def test_waiting_for_a_process_that_is_gone_returns_at_once() -> None:
    reaper.wait_for_exit(dead_record("run-1"))


# -- the summary -----------------------------------------------------------------------------


def test_teardown_lines_of_the_summary() -> None:
    rows = [
        teardown.Result("db", "ok", 0.25, "controller", "gw0").to_dict(),
        teardown.Result("web", "failed", 0.0, "controller", "gw1", "Traceback\nE: x").to_dict(),
        teardown.Result("q", "timeout", 1.0, "controller", "gw1", "still running").to_dict(),
        teardown.Result("old", "ok", 0.1, "controller", "gw2", None, True).to_dict(),
    ]

    lines = report.format_summary([], teardowns=rows)

    assert lines == [
        "teardowns:",
        "db  teardown by controller: done in 0.25 s",
        "web  teardown by controller: FAILED after 0.00 s",
        "    Traceback",
        "    E: x",
        "q  teardown by controller: HUNG after 1.00 s",
        "    still running",
        "old  teardown by controller: stopped what its unfinished build started in 0.10 s",
    ]


def test_a_service_started_outside_a_build_is_reported_to_nobody(tmp_path: Path) -> None:
    heard: list[dict[str, Any]] = []
    code = textwrap.dedent("import time; time.sleep(60)")
    with services.reporting_to(heard.append):
        inside = services.start([sys.executable, "-c", code], tmp_path, name="in")
    outside = services.start([sys.executable, "-c", code], tmp_path, name="out")
    try:
        assert [v["pid"] for v in heard] == [inside["pid"]]
    finally:
        services.stop(inside)
        services.stop(outside)


def test_a_service_torn_down_each_time_this_run_joins_it_is_a_clear_error(
    layout: Layout,
) -> None:
    from pytest_prewarm.exceptions import PrewarmLockError
    from pytest_prewarm.layout import template_id
    from pytest_prewarm.names import canonical_key
    from pytest_prewarm.request import Request, TemplateStore

    tid = template_id("svc", canonical_key(None, name="svc"))
    other = own_record("controller", "run-1")
    instance = teardown.record_building(
        layout,
        template="svc",
        tid=tid,
        run_id="run-1",
        worker="gw0",
        path=layout.data_dir(tid, BUILD),
        ref=teardown.reference(stop_recorded, "svc"),
        controller=other,
    )
    teardown.record_built(layout, instance, layout.data_dir(tid, BUILD), 1)
    # Published by run-1, whose last user has claimed its teardown (and is slow about it).
    layout.data_dir(tid, BUILD).mkdir(parents=True)
    store = TemplateStore(layout.root, run_id="run-2", worker="main")
    meta = Meta(
        "svc", "null", 1, "gw0", instance.pid, "run-1", store.boot_id, 0.1, 5.0, None, build=BUILD
    )
    layout.meta_file(tid).write_text(meta.to_json())
    layout.service_claim(tid, instance.instance).write_text(other.to_json())
    store.teardown_timeout = 0.01

    def build(path: Path) -> int:
        raise AssertionError("not built: the published template is found first")

    with pytest.raises(PrewarmLockError, match=r"tore its service down each of the 3 times"):
        store.get(Request("svc", build, None, 5.0, teardown=stop_recorded))
