"""Owner records are read defensively: nothing malformed crashes, blocks, or reads as "dead".

A table of hand-picked bad inputs, then hypothesis for the rest. The invariant behind both:
``parse_record`` / ``read_record`` never raise, and ``classify`` says DEAD only for a complete
record of this host, boot and pid namespace; fuzzed garbage is ``None`` or UNKNOWN.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import START_FIELD
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_prewarm import files, liveness
from pytest_prewarm.files import MAX_RECORD_BYTES, write_atomic
from pytest_prewarm.liveness import HostIdentity, Liveness
from pytest_prewarm.owner import (
    MAX_PID,
    OwnerRecord,
    parse_record,
    read_record,
)

# Without /proc there is no boot id, so no record is ever provably dead: the controls that
# expect DEAD need Linux.
linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="proving death needs Linux /proc"
)

NEEDS_FIFOS = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs (Windows)")
# Creating a symlink on Windows needs a privilege (or developer mode) that CI lacks.
NEEDS_SYMLINKS = pytest.mark.skipif(os.name != "posix", reason="symlinks need privileges")

FUZZ = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

VALID: dict[str, Any] = {
    "pid": 4242,
    "hostname": "build-host",
    "boot_id": "c683c601-02a0-41da-ab4c-14c209e77582",
    "pid_ns": 4026531836,
    "start_ticks": 123456,
    "create_time": 1700000000.25,
    "worker": "gw3",
    "run_id": "run-1",
    "started_at": 1700000001.5,
    "state": "held",
    "template": "db",
}


def doc(**changes: Any) -> str:
    """VALID as JSON text, with fields changed; a value of ``...`` removes the field."""
    data = {**VALID, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...})


@pytest.fixture(scope="module")
def here() -> HostIdentity:
    return liveness.local_host()


@pytest.fixture(scope="module")
def dead_pid() -> tuple[int, int]:
    """(pid, start ticks) of a child that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1000)"])
    try:
        ticks = liveness.start_ticks(child.pid)
    finally:
        child.kill()
        child.wait(timeout=30)
    return child.pid, 1 if ticks is None else ticks  # None where there is no /proc


def local_doc(here: HostIdentity, pid: int, ticks: int | None, **changes: Any) -> str:
    identity = {
        "pid": pid,
        "hostname": here.hostname,
        "boot_id": here.boot_id,
        "pid_ns": here.pid_ns,
        "start_ticks": ticks,
    }
    return doc(**{**identity, **changes})


def assert_well_typed(record: OwnerRecord) -> None:
    assert type(record.pid) is int
    assert 0 < record.pid <= MAX_PID
    for name in ("hostname", "boot_id"):
        assert getattr(record, name) is None or type(getattr(record, name)) is str
    for name in ("pid_ns", "start_ticks"):
        assert getattr(record, name) is None or type(getattr(record, name)) is int
    assert record.create_time is None or type(record.create_time) is float
    assert type(record.started_at) is float
    for name in ("worker", "run_id", "state", "template"):
        assert type(getattr(record, name)) is str
    assert record.worker
    assert record.state


def same_local_identity(record: OwnerRecord, here: HostIdentity) -> bool:
    return (
        record.hostname is not None
        and record.hostname == here.hostname
        and record.boot_id is not None
        and record.boot_id == here.boot_id
        and record.pid_ns is not None
        and record.pid_ns == here.pid_ns
        and getattr(record, START_FIELD) is not None
    )


def own_start() -> tuple[int, int | float | None]:
    """(pid, start time) of this process, the start time in the field of this code path."""
    pid, ticks, created = liveness.own_identity()
    return pid, created if START_FIELD == "create_time" else ticks


def start_of(record: OwnerRecord) -> tuple[int, int | float | None]:
    return record.pid, getattr(record, START_FIELD)


# --------------------------------------------------------------------------------------------
# parse_record: a table


def test_full_record_round_trips() -> None:
    record = parse_record(doc())
    assert record is not None
    assert record == OwnerRecord(**VALID)
    assert parse_record(record.to_json()) == record
    assert parse_record(record.released().to_json()) == record.released()
    assert record.released().state == "released"


def test_minimal_record_gets_defaults() -> None:
    record = parse_record('{"pid": 7}')
    assert record is not None
    assert record.pid == 7
    assert (record.hostname, record.boot_id, record.pid_ns, record.start_ticks) == (None,) * 4
    assert record.create_time is None
    assert record.worker == "<unknown worker>"
    assert (record.run_id, record.template) == ("", "")
    assert (record.state, record.started_at) == ("held", 0.0)


def test_unknown_fields_are_ignored() -> None:
    assert parse_record(doc(future_field={"x": [1, 2]})) == OwnerRecord(**VALID)


def test_integral_numbers_for_float_fields_are_accepted() -> None:
    record = parse_record(doc(create_time=1700000000, started_at=5))
    assert record is not None
    assert type(record.create_time) is float
    assert type(record.started_at) is float


DEEP = 200_000
BAD_DOCUMENTS = {
    "empty": "",
    "blank": " \n\t",
    "nul": "\x00",
    "garbage": "owner: gw3",
    "truncated": doc()[:-1],
    "half": doc()[: len(doc()) // 2],
    "trailing garbage": doc() + " x",
    "two objects": doc() + doc(),
    "byte order mark": "\ufeff" + doc(),
    "null": "null",
    "true": "true",
    "number": "4242",
    "string": json.dumps(doc()),
    "array": "[]",
    "array of record": f"[{doc()}]",
    "empty object": "{}",
    "single quotes": doc().replace('"', "'"),
    "NaN token pid": '{"pid": NaN}',
    "Infinity token pid": '{"pid": Infinity}',
    "-Infinity token pid": '{"pid": -Infinity}',
    "overflowing float pid": '{"pid": 1e400}',
    "5000-digit pid": '{"pid": ' + "9" * 5000 + "}",
    "deeply nested array": "[" * DEEP + "]" * DEEP,
    "deeply nested object": '{"a":' * DEEP + "1" + "}" * DEEP,
    "deeply nested extra field": doc()[:-1] + ', "x": ' + "[" * DEEP + "]" * DEEP + "}",
    "last duplicate key wins, invalid": doc()[:-1] + ', "pid": "4242"}',
}


@pytest.mark.parametrize("text", list(BAD_DOCUMENTS.values()), ids=list(BAD_DOCUMENTS))
def test_malformed_documents_parse_to_none(text: str) -> None:
    assert parse_record(text) is None


@pytest.mark.parametrize(
    "pid",
    [
        0,
        -1,
        -4242,
        MAX_PID + 1,
        2**31,
        2**63,
        2**64,
        10**100,
        True,
        False,
        4242.0,
        1.5,
        "4242",
        None,
        [],
        {},
        [4242],
        {"pid": 4242},
        float("nan"),
        float("inf"),
        float("-inf"),
    ],
    ids=repr,
)
def test_invalid_pids_are_rejected(pid: Any) -> None:
    assert parse_record(doc(pid=pid)) is None


def test_pid_missing_is_rejected() -> None:
    assert parse_record(doc(pid=...)) is None


@pytest.mark.parametrize("pid", [1, 2, 32768, MAX_PID])
def test_pid_bounds_that_are_accepted(pid: int) -> None:
    record = parse_record(doc(pid=pid))
    assert record is not None
    assert record.pid == pid


NOT_STR = [1, 0, 1.5, True, False, [], ["x"], {}, {"x": "y"}]
NOT_INT = ["1", "", 1.0, 1.5, True, False, [], [1], {}, float("nan"), float("inf")]
NOT_NUMBER = ["1.5", "", True, False, [], [1.5], {}]
WRONG_TYPES: dict[str, list[Any]] = {
    "hostname": NOT_STR,
    "boot_id": NOT_STR,
    "worker": NOT_STR,
    "run_id": NOT_STR,
    "state": NOT_STR,
    "template": NOT_STR,
    "pid_ns": NOT_INT,
    "start_ticks": NOT_INT,
    "create_time": NOT_NUMBER,
    "started_at": [*NOT_NUMBER, None],
}


@pytest.mark.parametrize(
    ("field", "value"),
    [(field, value) for field, values in WRONG_TYPES.items() for value in values],
    ids=lambda v: repr(v)[:20],
)
def test_wrong_type_in_any_field_rejects_the_record(field: str, value: Any) -> None:
    assert parse_record(doc(**{field: value})) is None


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("create_time", float("nan")),
        ("create_time", float("inf")),
        ("started_at", float("-inf")),
        ("started_at", float("nan")),
        ("start_ticks", -1),
        ("pid_ns", 0),
        ("start_ticks", 2**80),
    ],
    ids=repr,
)
def test_odd_numbers_never_crash(field: str, value: Any, here: HostIdentity) -> None:
    record = parse_record(doc(**{field: value}))
    if record is not None:
        assert_well_typed(record)
        assert liveness.classify(record, here).state is Liveness.UNKNOWN  # another host
        assert isinstance(liveness.held_for(record), float)


@pytest.mark.parametrize("field", [f for f in VALID if f != "pid"])
def test_missing_optional_fields_still_parse(field: str) -> None:
    record = parse_record(doc(**{field: ...}))
    assert record is not None
    assert_well_typed(record)


@linux_only
@pytest.mark.parametrize("field", ["hostname", "boot_id", "pid_ns", START_FIELD])
@pytest.mark.parametrize("how", ["missing", "null"])
def test_missing_identity_field_makes_a_dead_pid_unknown(
    field: str, how: str, here: HostIdentity, dead_pid: tuple[int, int]
) -> None:
    complete = parse_record(local_doc(here, *dead_pid))
    assert complete is not None
    assert liveness.classify(complete, here).state is Liveness.DEAD  # control: provably dead
    text = local_doc(here, *dead_pid, **{field: ... if how == "missing" else None})
    record = parse_record(text)
    assert record is not None
    assert getattr(record, field) is None
    assert liveness.classify(record, here).state is Liveness.UNKNOWN


def test_describe_names_worker_pid_and_host() -> None:
    record = OwnerRecord(**VALID)
    assert record.describe(local_hostname="build-host") == "gw3, pid 4242 on this host"
    assert record.describe(local_hostname="other") == "gw3, pid 4242 on host build-host"
    assert record.describe() == "gw3, pid 4242 on host build-host"
    anonymous = parse_record(doc(hostname=None))
    assert anonymous is not None
    assert anonymous.describe(local_hostname=None) == "gw3, pid 4242 on host <unrecorded>"


# --------------------------------------------------------------------------------------------
# parse_record + classify: hypothesis

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=10,
)
odd_ints = st.sampled_from([0, -1, 1, 2, MAX_PID, MAX_PID + 1, 2**31 - 1, 2**31, 2**63, 2**64])


@st.composite
def record_dicts(draw: st.DrawFn, here: HostIdentity, dead: tuple[int, int]) -> dict[str, Any]:
    """Record-shaped dicts: a plausible record (often of this host, often of our own or a dead
    pid) with a few fields then replaced by arbitrary JSON or removed."""
    own_pid, own_ticks, own_created = liveness.own_identity()
    record = draw(
        st.fixed_dictionaries(
            {
                "pid": st.sampled_from([own_pid, dead[0]]) | st.integers(1, MAX_PID),
                "hostname": st.just(here.hostname) | st.text(max_size=20),
                "boot_id": st.just(here.boot_id) | st.text(max_size=40),
                "pid_ns": st.just(here.pid_ns) | st.integers(0, 2**32),
                "start_ticks": st.sampled_from([own_ticks, dead[1]]) | st.integers(-1, 2**64),
                "create_time": st.none() | st.just(own_created) | st.floats(),
                "started_at": st.floats() | st.integers(),
                "worker": st.text(max_size=10),
                "run_id": st.text(max_size=10),
                "state": st.sampled_from(["held", "released", ""]),
                "template": st.text(max_size=10),
            }
        )
    )
    fields = st.sampled_from(sorted(record))
    record.update(draw(st.dictionaries(fields, json_values | odd_ints, max_size=3)))
    for name in draw(st.sets(fields, max_size=3)):
        del record[name]
    return record


def check_classification(record: OwnerRecord | None, here: HostIdentity) -> Liveness:
    verdict = liveness.classify(record, here)
    assert isinstance(verdict.reason, str)
    assert verdict.reason
    if record is None:
        assert verdict.state is Liveness.UNKNOWN
        return verdict.state
    assert_well_typed(record)
    if not same_local_identity(record, here):
        assert verdict.state is Liveness.UNKNOWN, (record, verdict)
    if same_local_identity(record, here) and start_of(record) == own_start():
        assert verdict.state is Liveness.ALIVE, (record, verdict)
    return verdict.state


@FUZZ
@given(text=st.text())
def test_fuzz_text_never_raises_and_is_never_dead(text: str) -> None:
    here = liveness.local_host()
    record = parse_record(text)
    assert record is None or check_classification(record, here) is Liveness.UNKNOWN


@FUZZ
@given(value=json_values)
def test_fuzz_json_values_never_raise_and_are_never_dead(value: Any) -> None:
    here = liveness.local_host()
    record = parse_record(json.dumps(value))
    assert record is None or check_classification(record, here) is Liveness.UNKNOWN


@FUZZ
@given(data=st.data())
def test_fuzz_record_shaped_dicts(
    data: st.DataObject, here: HostIdentity, dead_pid: tuple[int, int]
) -> None:
    value = data.draw(record_dicts(here, dead_pid))
    record = parse_record(json.dumps(value))
    if record is None:
        assert check_classification(None, here) is Liveness.UNKNOWN
        return
    assert record.pid == value["pid"]
    state = check_classification(record, here)
    if state is Liveness.DEAD:
        assert same_local_identity(record, here)
        assert start_of(record) != own_start()


@FUZZ
@given(
    record=st.builds(
        OwnerRecord,
        pid=st.integers(1, MAX_PID),
        hostname=st.none() | st.text(),
        boot_id=st.none() | st.text(),
        pid_ns=st.none() | st.integers(),
        start_ticks=st.none() | st.integers(),
        create_time=st.none() | st.floats(allow_nan=False),
        worker=st.text(min_size=1),
        run_id=st.text(),
        started_at=st.floats(allow_nan=False),
        state=st.text(min_size=1),
        template=st.text(),
    )
)
def test_fuzz_to_json_round_trips(record: OwnerRecord) -> None:
    assert parse_record(record.to_json()) == record


# --------------------------------------------------------------------------------------------
# read_record: files that are not records


@pytest.fixture
def record_text(here: HostIdentity, dead_pid: tuple[int, int]) -> str:
    """A valid record that classifies DEAD here: reading it would matter."""
    return local_doc(here, *dead_pid)


def test_read_record_reads_what_write_atomic_wrote(tmp_path: Path, record_text: str) -> None:
    path = tmp_path / "owner.json"
    write_atomic(path, record_text)
    assert read_record(path) == parse_record(record_text)
    assert [p.name for p in tmp_path.iterdir()] == ["owner.json"]


def test_missing_file_is_none(tmp_path: Path) -> None:
    assert read_record(tmp_path / "owner.json") is None
    assert read_record(tmp_path / "no-such-dir" / "owner.json") is None


@pytest.mark.parametrize(
    "content",
    [b"", b"\xff\xfe\x00garbage", b'{"pid": 42, "hostname": "\xc3\x28"}', b"\x00" * 100],
    ids=["empty", "binary", "invalid utf-8 in a string", "nul bytes"],
)
def test_undecodable_or_empty_files_are_none(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "owner.json"
    path.write_bytes(content)
    assert read_record(path) is None


def test_record_exactly_at_the_size_limit_is_read(tmp_path: Path, record_text: str) -> None:
    path = tmp_path / "owner.json"
    path.write_text(record_text + " " * (MAX_RECORD_BYTES - len(record_text)))
    assert path.stat().st_size == MAX_RECORD_BYTES
    assert read_record(path) == parse_record(record_text)


def test_record_one_byte_over_the_limit_is_none(tmp_path: Path, record_text: str) -> None:
    path = tmp_path / "owner.json"
    path.write_text(record_text + " " * (MAX_RECORD_BYTES + 1 - len(record_text)))
    assert read_record(path) is None


def test_huge_file_is_not_read(
    tmp_path: Path, record_text: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "owner.json"
    path.write_text(record_text)
    os.truncate(path, 8 * 1024**3)  # sparse: 8 GiB that would take a while to read whole
    requested: list[int] = []
    real_read = os.read

    def spy(fd: int, n: int) -> bytes:
        requested.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(files.os, "read", spy)
    started = time.monotonic()
    assert read_record(path) is None
    assert time.monotonic() - started < 5
    assert sum(requested) <= MAX_RECORD_BYTES + 1


@NEEDS_SYMLINKS
def test_symlink_to_a_valid_record_outside_is_not_followed(
    tmp_path: Path, record_text: str
) -> None:
    outside = tmp_path / "elsewhere" / "owner.json"
    outside.parent.mkdir()
    outside.write_text(record_text)
    assert read_record(outside) is not None  # control: the target itself is a good record
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    link = lock_dir / "owner.json"
    link.symlink_to(outside)
    assert read_record(link) is None
    relative = lock_dir / "relative.json"
    relative.symlink_to(Path("..") / "elsewhere" / "owner.json")
    assert read_record(relative) is None


@NEEDS_SYMLINKS
def test_symlink_inside_the_dir_and_dangling_symlink_are_none(
    tmp_path: Path, record_text: str
) -> None:
    real = tmp_path / "real.json"
    real.write_text(record_text)
    (tmp_path / "owner.json").symlink_to("real.json")
    (tmp_path / "dangling.json").symlink_to("nowhere.json")
    (tmp_path / "loop.json").symlink_to("loop.json")
    assert read_record(tmp_path / "owner.json") is None
    assert read_record(tmp_path / "dangling.json") is None
    assert read_record(tmp_path / "loop.json") is None


def read_in_thread(path: Path, unblock: Path) -> OwnerRecord | None:
    """read_record(path), failing (not hanging) if it blocks; ``unblock`` is the FIFO to poke."""
    result: list[OwnerRecord | None] = []
    thread = threading.Thread(target=lambda: result.append(read_record(path)), daemon=True)
    thread.start()
    thread.join(timeout=10)
    if thread.is_alive():
        # A blocking open of the FIFO for reading returns once a writer shows up.
        with contextlib.suppress(OSError):
            os.close(os.open(unblock, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(timeout=10)
        pytest.fail(f"read_record({path.name}) blocked on a FIFO")
    return result[0]


@NEEDS_FIFOS
def test_fifo_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "owner.json"
    os.mkfifo(fifo)
    assert read_in_thread(fifo, fifo) is None


@NEEDS_FIFOS
def test_fifo_with_a_silent_writer_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "owner.json"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    try:
        assert read_in_thread(fifo, fifo) is None
    finally:
        os.close(writer)
        os.close(reader)


@NEEDS_FIFOS
def test_symlink_to_a_fifo_outside_does_not_block(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    link = tmp_path / "owner.json"
    link.symlink_to(fifo)
    assert read_in_thread(link, fifo) is None


def test_directory_is_none(tmp_path: Path, record_text: str) -> None:
    path = tmp_path / "owner.json"
    path.mkdir()
    (path / "owner.json").write_text(record_text)
    assert read_record(path) is None


def test_unix_socket_is_none(tmp_path: Path) -> None:
    path = tmp_path / "owner.json"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        assert read_record(path) is None


@linux_only
def test_character_device_is_none(tmp_path: Path) -> None:
    path = tmp_path / "owner.json"
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: endless bytes
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")
    assert read_record(path) is None


@FUZZ
@given(content=st.binary(max_size=2048))
def test_fuzz_file_bytes_never_raise_and_are_never_dead(
    content: bytes, tmp_path_factory: pytest.TempPathFactory
) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz-owner.json"
    path.write_bytes(content)
    record = read_record(path)
    assert record is None or check_classification(record, liveness.local_host()) is not (
        Liveness.DEAD
    )


# --------------------------------------------------------------------------------------------
# write_atomic


def test_write_atomic_replaces_a_planted_symlink_instead_of_writing_through_it(
    tmp_path: Path, record_text: str
) -> None:
    outside = tmp_path / "victim.txt"
    outside.write_text("precious")
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    path = lock_dir / "owner.json"
    path.symlink_to(outside)
    write_atomic(path, record_text)
    assert outside.read_text() == "precious"
    assert not path.is_symlink()
    assert read_record(path) == parse_record(record_text)


def test_write_atomic_failure_keeps_the_old_record_and_leaves_no_temp_file(
    tmp_path: Path, record_text: str
) -> None:
    path = tmp_path / "owner.json"
    write_atomic(path, record_text)
    with pytest.raises(UnicodeEncodeError):
        write_atomic(path, '{"pid": 1, "hostname": "\ud800"}')  # lone surrogate: not UTF-8
    assert read_record(path) == parse_record(record_text)
    assert [p.name for p in tmp_path.iterdir()] == ["owner.json"]


def test_readers_see_a_whole_record_while_it_is_rewritten(
    tmp_path: Path, here: HostIdentity
) -> None:
    """Alternate a short and a long record; a concurrent reader never sees a partial one."""
    path = tmp_path / "owner.json"
    short = doc(pid=1, template="")
    long = doc(pid=2, template="t" * 30_000)
    write_atomic(path, short)
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer() -> None:
        try:
            for i in range(300):
                write_atomic(path, long if i % 2 else short)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            stop.set()

    thread = threading.Thread(target=writer)
    thread.start()
    seen = set()
    try:
        while not stop.is_set():
            record = read_record(path)
            assert record is not None
            seen.add(record.pid)
    finally:
        thread.join(timeout=60)
    assert not errors
    assert seen <= {1, 2}
    assert not [p for p in tmp_path.iterdir() if p.name != "owner.json"]


@linux_only
def test_released_record_is_still_judged_by_identity(
    here: HostIdentity, dead_pid: tuple[int, int]
) -> None:
    record = parse_record(local_doc(here, *dead_pid, state="released"))
    assert record is not None
    assert record.state == "released"
    assert liveness.classify(record, here).state is Liveness.DEAD


def test_nan_started_at_gives_a_finite_age() -> None:
    record = parse_record(doc(started_at=float("nan")))
    assert record is not None
    assert not math.isnan(liveness.held_for(record))
