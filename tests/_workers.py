"""The subprocess side of test_recovery.py, test_lease.py and test_chaos.py.

``python tests/_workers.py '<json config>'`` runs one competitor: a process that asks a
TemplateStore for a template, building it if the lock is its, and leaves evidence behind:

- ``<flags>/asking-<worker>``: about to ask for the template;
- ``<flags>/waiting-<worker>``: it is waiting; the text is the live waiting message's
  holder description (rewritten at every notice);
- ``<flags>/building-<worker>``: its builder started; ``blocked-<worker>``: the builder
  waits (before or after writing its files) for the test to create ``release-<worker>``;
- ``<log>``: one JSON line per build start and end (and per self-inflicted kill), appended
  with O_APPEND so concurrent writers never tear a line;
- ``<flags>/result-<worker>.json``: what it got (origin, value, whether the template was
  complete) or the error it raised, and the events its store recorded.

``python tests/_workers.py --chaos '<json>'`` runs chaos trials: per trial it forks the
competitors from this already-imported interpreter (a fresh interpreter costs 0.7 s, most
of it importing pytest), waits for them with a deadline, and writes ``outcome.json``.

The test side (``Arena``, ``overlaps``, ``verify``...) is imported by those test files.
Nothing here synchronises by sleeping: every wait polls a file or a pidfd with a bound.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import select
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pytest_prewarm.exceptions import PrewarmError
from pytest_prewarm.request import Request, TemplateStore


def wait_until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.002)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def log_line(log: Path, **data: Any) -> None:
    data.setdefault("pid", os.getpid())
    data["t"] = time.monotonic()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, (json.dumps(data) + "\n").encode())
    finally:
        os.close(fd)


def read_log(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


def overlaps(entries: list[dict[str, Any]]) -> list[str]:
    """Builds that started while another build was running, by the build log's order.

    A build runs from its ``start`` line to its ``end`` line, or to the ``kill`` line its
    process wrote just before SIGKILLing itself (it cannot run after that).
    """
    problems = []
    active: dict[str, Any] | None = None
    for entry in entries:
        if entry["ev"] == "start":
            if active is not None:
                problems.append(f"{entry['worker']} started while {active['worker']} built")
            active = entry
        elif entry["ev"] in ("end", "kill") and active and entry["pid"] == active["pid"]:
            active = None
    return problems


def content(index: int) -> bytes:
    return (f"file {index} ".encode() * (40 + 13 * index))[: 100 + 57 * index]


def verify(path: Path) -> int:
    """Raise unless ``path`` holds exactly the files its manifest lists, all whole."""
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))
    found = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in path.iterdir()
        if p.name != "manifest.json"
    }
    if found != manifest:
        raise AssertionError(f"partial template at {path}: {sorted(found)} vs {sorted(manifest)}")
    return len(found)


def _arm_self_kill(cfg: dict[str, Any], log: Path) -> None:
    """The first builder of a chaos trial (the one that creates the token) dies later."""
    kill = cfg.get("kill_self")
    if not kill:
        return
    try:
        os.close(os.open(kill["token"], os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return  # someone else was the first builder: we are a takeover

    def die() -> None:
        log_line(log, ev="kill", worker=cfg["worker"])
        os.kill(os.getpid(), signal.SIGKILL)

    timer = threading.Timer(kill["delay"], die)
    timer.daemon = True
    timer.start()


def make_builder(cfg: dict[str, Any]) -> Any:
    flags = Path(cfg["flags"])
    log = Path(cfg["log"])
    worker = cfg["worker"]
    block = cfg.get("block")
    release = flags / f"release-{worker}"

    def wait_for_release() -> None:
        (flags / f"blocked-{worker}").touch()
        wait_until(release.exists, cfg.get("block_timeout", 100.0), f"{release.name}")

    def build(path: Path) -> dict[str, Any]:
        siblings = sorted(p.name for p in path.parent.parent.iterdir())
        log_line(
            log,
            ev="start",
            worker=worker,
            empty=not any(path.iterdir()),
            siblings=siblings,
            path=str(path),
        )
        _arm_self_kill(cfg, log)
        (flags / f"building-{worker}").touch()
        if block == "before":
            wait_for_release()
        manifest = {}
        for i in range(cfg.get("files", 20)):
            data = content(i)
            (path / f"part-{i:03d}.bin").write_bytes(data)
            manifest[f"part-{i:03d}.bin"] = hashlib.sha256(data).hexdigest()
            if cfg.get("pause"):
                time.sleep(cfg["pause"])  # spreads the build over time for random kills
        (path / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
        if block == "after":
            wait_for_release()
        log_line(log, ev="end", worker=worker)
        return {"by": worker, "pid": os.getpid()}

    return build


def compete(cfg: dict[str, Any]) -> int:
    """Ask for the template once; return the exit code (0: got a complete template)."""
    flags = Path(cfg["flags"])
    worker = cfg["worker"]
    if cfg.get("hostname"):
        socket.sethostname(cfg["hostname"])  # only ever inside `unshare --uts`
    barrier = cfg.get("barrier")
    if barrier:
        (flags / f"ready-{worker}").touch()
        go = flags / "go"
        wait_until(go.exists, 60.0, "the go signal")

    def notice(name: str, waited: float, holder: Any) -> None:
        write_atomic(flags / f"waiting-{worker}", holder.describe())

    store = TemplateStore(
        Path(cfg["lock_dir"]),
        run_id=cfg.get("run_id", "run"),
        worker=worker,
        notice_every=cfg.get("notice_every", 0.05),
        on_notice=notice,
        lock_mode=cfg["mode"],
        stale_after=cfg.get("stale_after", 30.0),
        heartbeat=cfg.get("heartbeat", 0.2),
    )
    result: dict[str, Any] = {"worker": worker, "pid": os.getpid()}
    (flags / f"asking-{worker}").touch()
    code = 0
    try:
        template = store.get(
            Request(cfg.get("name", "db"), make_builder(cfg), cfg.get("key", "k"), cfg["timeout"])
        )
        result.update(origin=template.origin, value=template.value, built_by=template.built_by)
        result["files"] = verify(template.path)
        result["ok"] = True
    except (PrewarmError, AssertionError, OSError) as exc:
        result.update(ok=False, error_type=type(exc).__name__, error=str(exc))
        code = 3
    result["events"] = [event.to_dict() for event in store.events]
    write_atomic(flags / f"result-{worker}.json", json.dumps(result))
    return code


# -- the test side -------------------------------------------------------------------------

SCRIPT = str(Path(__file__).resolve())


def proc_state(pid: int) -> str | None:
    """Field 3 of /proc/PID/stat (R, S, T, t, Z...), or None once the pid is gone.

    The one reader of it for every test file (test_lease, test_liveness, test_filelock_peers).
    """
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rpartition(")")[2].split()[0]


def has_exited(pid: int) -> bool:
    """Whether our child ``pid`` has exited, *without* reaping it (a zombie stays one)."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True
    return info is not None


class Arena:
    """One lock dir, one flags dir and one build log shared by competitor processes.

    ``processes`` is conftest's Processes: everything started here is killed (process
    group) and reaped at teardown, zombies we keep on purpose included.
    """

    def __init__(self, root: Path, processes: Any, *, run_id: str = "run") -> None:
        self.root = root
        self.processes = processes
        self.flags = root / "flags"
        self.lock_dir = root / "lock-dir"
        self.log = root / "build.log"
        self.run_id = run_id
        self.flags.mkdir(parents=True)
        self.procs: dict[str, Any] = {}

    def config(self, worker: str, **cfg: Any) -> dict[str, Any]:
        base = {
            "lock_dir": str(self.lock_dir),
            "worker": worker,
            "run_id": self.run_id,
            "flags": str(self.flags),
            "log": str(self.log),
            "timeout": 60.0,
        }
        return {**base, **cfg}

    def start(self, worker: str, *, wrap: tuple[str, ...] = (), **cfg: Any) -> Any:
        argv = [*wrap, sys.executable, SCRIPT, json.dumps(self.config(worker, **cfg))]
        proc = self.processes.spawn(argv)
        self.procs[worker] = proc
        return proc

    def flag(self, name: str) -> Path:
        return self.flags / name

    def _outputs(self) -> str:
        return "\n".join(f"--- {w} (pid {p.pid}):\n{p.output()}" for w, p in self.procs.items())

    def wait_flag(self, name: str, *, timeout: float = 30.0) -> Path:
        """Wait for a flag file; fail at once, with every output, if a process died first."""
        path = self.flag(name)
        deadline = time.monotonic() + timeout
        while not path.exists():
            for worker, proc in self.procs.items():
                done = self.flag(f"result-{worker}.json").exists()
                killed = self.flag(f"killed-{worker}").exists()
                if has_exited(proc.pid) and not (done or killed or path.exists()):
                    raise AssertionError(f"{worker} exited before {name}:\n{self._outputs()}")
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {name} after {timeout} s:\n{self._outputs()}")
            time.sleep(0.002)
        return path

    def result(self, worker: str, *, timeout: float = 60.0) -> dict[str, Any]:
        path = self.wait_flag(f"result-{worker}.json", timeout=timeout)
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        return data

    def release(self, worker: str) -> None:
        self.flag(f"release-{worker}").touch()

    def kill(self, worker: str, *, pid: int | None = None) -> int:
        """SIGKILL ``worker`` and leave it an unreaped zombie; return its pid.

        The kill is logged first: the build log then proves that nobody started a build
        while the killed builder was still alive.
        """
        proc = self.procs[worker]
        pid = proc.pid if pid is None else pid
        self.flag(f"killed-{worker}").touch()
        log_line(self.log, ev="kill", worker=worker, pid=pid)
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: proc_state(pid) in ("Z", None), 30.0, f"pid {pid} to die")
        return pid

    def builds(self) -> list[dict[str, Any]]:
        return [e for e in read_log(self.log) if e["ev"] == "start"]

    def lease_dir(self) -> Path:
        (found,) = (self.lock_dir / "locks").glob("*.lease")
        return found

    def lease_files(self) -> set[str]:
        return {p.name for p in self.lease_dir().iterdir() if not p.name.startswith(".")}


# -- chaos trials -------------------------------------------------------------------------


def _run_trial(spec: dict[str, Any], index: int, rng: random.Random) -> dict[str, Any]:
    trial = Path(spec["root"]) / f"trial-{index:03d}"
    flags = trial / "flags"
    flags.mkdir(parents=True)
    delay = rng.uniform(0.0, spec["max_delay"])
    configs = [
        {
            "lock_dir": str(trial / "lock-dir"),
            "mode": spec["mode"],
            "worker": f"c{i}",
            "flags": str(flags),
            "log": str(trial / "build.log"),
            "files": spec["files"],
            "pause": spec["pause"],
            "timeout": spec["timeout"],
            "stale_after": spec["stale_after"],
            "heartbeat": spec["heartbeat"],
            "notice_every": 3600.0,
            "kill_self": {"token": str(trial / "kill-token"), "delay": delay},
        }
        for i in range(spec["competitors"])
    ]
    pids = []
    for cfg in configs:
        pid = os.fork()
        if pid == 0:  # the competitor
            code = 70
            try:
                code = compete(cfg)
            finally:
                os._exit(code)
        pids.append(pid)
    # Wait for every competitor to exit without reaping it: a SIGKILLed builder stays a
    # zombie for the rest of the trial, as under pytest-xdist.
    pidfds = {os.pidfd_open(pid): pid for pid in pids}
    poller = select.poll()
    for fd in pidfds:
        poller.register(fd, select.POLLIN)
    running = set(pidfds)
    deadline = time.monotonic() + spec["deadline"]
    while running:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        for fd, _ in poller.poll(left * 1000):
            running.discard(fd)
            poller.unregister(fd)
    hung = sorted(pidfds[fd] for fd in running)
    for pid in hung:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    status = {}
    for fd, pid in pidfds.items():
        _, raw = os.waitpid(pid, 0)
        status[str(pid)] = os.waitstatus_to_exitcode(raw)
        os.close(fd)
    outcome = {"delay": delay, "pids": pids, "status": status, "hung": hung}
    write_atomic(trial / "outcome.json", json.dumps(outcome))
    return outcome


def chaos(spec: dict[str, Any]) -> int:
    rng = random.Random(spec["seed"])
    for index in range(spec["trials"]):
        _run_trial(spec, index, rng)
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "--chaos":
        sys.exit(chaos(json.loads(sys.argv[2])))
    sys.exit(compete(json.loads(sys.argv[1])))
