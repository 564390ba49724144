"""A PostgreSQL server for tests, from Debian's packages, driven with psql (no Python driver).

``start(path)`` runs initdb and starts the server; ``stop(value)`` stops it and removes its
data. The data directory lives outside ``path``: the server runs as an unprivileged user
(initdb and postgres refuse root), who cannot enter the plugin's lock dir (mode 0700).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from pytest_prewarm import services

SCHEMA = """
CREATE TABLE customers (
    id integer PRIMARY KEY,
    email text NOT NULL UNIQUE,
    country text NOT NULL
);
CREATE TABLE products (
    id integer PRIMARY KEY,
    name text NOT NULL,
    price_cents integer NOT NULL CHECK (price_cents > 0)
);
CREATE TABLE orders (
    id integer PRIMARY KEY,
    customer_id integer NOT NULL REFERENCES customers (id),
    placed_on date NOT NULL
);
CREATE TABLE order_items (
    order_id integer NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    product_id integer NOT NULL REFERENCES products (id),
    quantity integer NOT NULL CHECK (quantity > 0),
    PRIMARY KEY (order_id, product_id)
);
INSERT INTO customers
    SELECT i, 'customer' || i || '@example.com', (ARRAY['DE', 'FR', 'NL', 'PL'])[1 + i % 4]
    FROM generate_series(1, 5000) AS i;
INSERT INTO products
    SELECT i, 'product ' || i, 100 + (i * 37) % 9900 FROM generate_series(1, 1000) AS i;
INSERT INTO orders
    SELECT i, 1 + (i * 7919) % 5000, DATE '2024-01-01' + (i % 365)
    FROM generate_series(1, 20000) AS i;
INSERT INTO order_items
    SELECT o, 1 + (o * 31 + k * 17) % 1000, 1 + (o + k) % 5
    FROM generate_series(1, 20000) AS o, generate_series(1, 3) AS k;
CREATE INDEX orders_by_customer ON orders (customer_id);
ANALYZE;
"""
CUSTOMERS, PRODUCTS, ORDERS, ITEMS = 5000, 1000, 20000, 60000
TEMPLATE_DB = "shop"
INITDB = ("-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions")
# Unaligned, tuples only, tab-separated, stop at the first error; over TCP as postgres.
PSQL = ["-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1"]
PSQL += ["-h", "127.0.0.1", "-U", "postgres"]


def bin_dir() -> Path | None:
    """The newest Debian PostgreSQL's binaries (/usr/lib/postgresql/N/bin), if installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/postgres"), key=_major)
    return Path(found[-1]).parent if found else None


def _major(path: str) -> int:
    part = Path(path).parent.parent.name
    return int(part) if part.isdigit() else 0


def server_user() -> str | None:
    """Who runs the server: None (ourselves) unless we are root, which PostgreSQL refuses."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "prewarm-pg"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    # Exit status 9: created meanwhile by a concurrent run. Anything else is an error.
    done = subprocess.run(
        ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "prewarm-pg"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode not in (0, 9):
        raise RuntimeError(f"useradd prewarm-pg failed: {done.stderr}")
    return "prewarm-pg"


def start(path: Path) -> dict[str, Any]:
    """initdb, start the server (logging to path/postgres.log), build the template database."""
    bindir = bin_dir()
    if bindir is None:
        raise RuntimeError("PostgreSQL is not installed: apt-get install -y postgresql")
    user = server_user()
    home = Path(tempfile.mkdtemp(prefix="prewarm-pg-"))
    data = home / "data"
    if user is not None:
        os.chown(home, pwd.getpwnam(user).pw_uid, -1)
    subprocess.run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", *INITDB],
        cwd=home,
        user=user,
        capture_output=True,
        check=True,
    )
    port = services.free_port()
    argv = [str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-h", "127.0.0.1"]
    # Test settings: no unix socket (its path would be too long), nothing flushed to disk.
    argv += ["-k", "", "-c", "fsync=off", "-c", "synchronous_commit=off"]
    argv += ["-c", "full_page_writes=off", "-c", "max_connections=50"]
    server = services.start(
        argv,
        path,
        name="postgres",
        port=port,
        ready_line="database system is ready to accept connections",
        timeout=60,
        cwd=home,
        user=user,
    )
    value = {"server": server, "port": port, "home": str(home)}
    psql(value, "postgres", f"CREATE DATABASE {TEMPLATE_DB}")
    psql(value, TEMPLATE_DB, SCHEMA)
    return value


def stop(value: dict[str, Any]) -> None:
    """Fast shutdown (SIGINT: disconnect clients, stop), then remove the data directory."""
    services.stop(value["server"], sig=signal.SIGINT, grace=30)
    shutil.rmtree(value["home"], ignore_errors=True)


def psql(value: dict[str, Any], database: str, sql: str) -> list[list[str]]:
    """Run ``sql`` in ``database``; the rows of the last statement, as lists of strings."""
    bindir = bin_dir()
    assert bindir is not None
    done = subprocess.run(
        [str(bindir / "psql"), *PSQL, "-p", str(value["port"]), "-d", database],
        input=sql,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"psql failed ({done.returncode}): {done.stderr.strip()}\n{sql}")
    return [line.split("\t") for line in done.stdout.splitlines() if line]


def server_processes(homes: list[str]) -> list[int]:
    """Pids of postgres processes still running on one of these data directories."""
    import psutil

    found = []
    for proc in psutil.process_iter(["name", "cmdline", "cwd"]):
        try:
            if proc.info["name"] != "postgres" or proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.Error:
            continue
        where = " ".join(proc.info["cmdline"] or []) + " " + (proc.info["cwd"] or "")
        if any(home in where for home in homes):
            found.append(proc.pid)
    return found
