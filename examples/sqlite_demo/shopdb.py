"""Schema and deterministic data generator for the demo's shop database.

This module knows nothing about pytest or pytest-prewarm: ``build()`` writes a complete SQLite
database into a directory and returns a JSON-able summary of what it wrote. The conftest
registers it as a prewarm template so that one process per test run pays for it.

The cost is deliberately realistic rather than artificial: generating a few hundred thousand
rows in Python, bulk-loading them, building the indexes afterwards, ``ANALYZE`` for the query
planner and a final ``VACUUM`` take a few seconds, which is what every xdist worker would pay
on its own without the plugin.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
from datetime import UTC, datetime, timedelta
from itertools import accumulate
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pathlib import Path

DB_FILENAME = "shop.sqlite3"

# What build() returns: JSON-able facts about the database (counts, totals, best sellers, hash).
Summary = dict[str, Any]
SEED = 20_240_611

N_CUSTOMERS = 10_000
N_PRODUCTS = 2_000
N_ORDERS = 60_000
MAX_ITEMS_PER_ORDER = 6

# Only these statuses count as revenue: pending orders are not paid yet, cancelled ones never
# will be. Tests and the build summary share this definition through REVENUE_STATUSES_SQL.
REVENUE_STATUSES = ("paid", "shipped")
REVENUE_STATUSES_SQL = "(" + ", ".join(f"'{s}'" for s in REVENUE_STATUSES) + ")"
STATUS_WEIGHTS = {"paid": 55, "shipped": 30, "pending": 8, "cancelled": 7}

SCHEMA = """
CREATE TABLE customers (
    id           INTEGER PRIMARY KEY,
    email        TEXT    NOT NULL UNIQUE,
    name         TEXT    NOT NULL,
    country      TEXT    NOT NULL,
    signed_up_at TEXT    NOT NULL
);

CREATE TABLE products (
    id          INTEGER PRIMARY KEY,
    sku         TEXT    NOT NULL UNIQUE,
    name        TEXT    NOT NULL,
    category    TEXT    NOT NULL,
    price_cents INTEGER NOT NULL CHECK (price_cents > 0)
);

-- Deleting a customer takes their order history with it (GDPR-style erasure) ...
CREATE TABLE orders (
    id          INTEGER PRIMARY KEY,
    customer_id INTEGER NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
    status      TEXT    NOT NULL
                CHECK (status IN ('pending', 'paid', 'shipped', 'cancelled')),
    ordered_at  TEXT    NOT NULL
);

-- ... but a product that was ever sold must not vanish from under its order lines.
-- unit_price_cents is the price actually charged, which differs from the list price
-- whenever a discount applied.
CREATE TABLE order_items (
    order_id         INTEGER NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
    product_id       INTEGER NOT NULL REFERENCES products (id) ON DELETE RESTRICT,
    quantity         INTEGER NOT NULL CHECK (quantity > 0),
    unit_price_cents INTEGER NOT NULL CHECK (unit_price_cents > 0),
    PRIMARY KEY (order_id, product_id)
) WITHOUT ROWID;
"""

# Created after the bulk load: filling a table and then sorting once into a fresh index is much
# cheaper than updating the index row by row. orders.customer_id and order_items.product_id also
# keep ON DELETE CASCADE / RESTRICT from scanning whole child tables.
INDEXES = {
    "orders_customer_id": "CREATE INDEX orders_customer_id ON orders (customer_id)",
    "orders_ordered_at": "CREATE INDEX orders_ordered_at ON orders (ordered_at)",
    "order_items_product_id": "CREATE INDEX order_items_product_id ON order_items (product_id)",
    "customers_country": "CREATE INDEX customers_country ON customers (country)",
}

FIRST_NAMES = (
    "Ada", "Alan", "Barbara", "Brian", "Claude", "Dennis", "Donald", "Edsger", "Frances", "Grace",
    "Guido", "Hedy", "Ivan", "Jean", "John", "Ken", "Linus", "Margaret", "Niklaus", "Radia",
    "Rasmus", "Shafi", "Sophie", "Tim", "Yukihiro",
)  # fmt: skip
LAST_NAMES = (
    "Allen", "Backus", "Cerf", "Dijkstra", "Engelbart", "Floyd", "Goldberg", "Hamilton",
    "Hopper", "Kay", "Knuth", "Lamport", "Liskov", "Lovelace", "McCarthy", "Perlman", "Ritchie",
    "Stroustrup", "Sutherland", "Thompson", "Torvalds", "Turing", "Wilson", "Wirth",
)  # fmt: skip
# (country, relative weight): a skewed market, as real shops have.
COUNTRIES = (
    ("US", 30), ("DE", 14), ("GB", 12), ("FR", 10), ("NL", 6), ("SE", 5), ("ES", 5), ("IT", 5),
    ("PL", 4), ("CA", 4), ("JP", 3), ("BR", 2),
)  # fmt: skip
CATEGORIES = ("books", "garden", "kitchen", "office", "outdoor", "toys", "electronics", "tools")
ADJECTIVES = (
    "Compact", "Deluxe", "Ergonomic", "Foldable", "Heavy-Duty", "Modular", "Portable", "Rugged",
    "Smart", "Vintage", "Wireless", "Classic",
)  # fmt: skip
NOUNS = {
    "books": ("Atlas", "Cookbook", "Field Guide", "Novel", "Handbook"),
    "garden": ("Planter", "Hose", "Rake", "Trellis", "Seed Kit"),
    "kitchen": ("Kettle", "Skillet", "Knife Set", "Grinder", "Blender"),
    "office": ("Desk Lamp", "Notebook", "Stapler", "Monitor Arm", "Chair"),
    "outdoor": ("Tent", "Lantern", "Backpack", "Hammock", "Cooler"),
    "toys": ("Puzzle", "Kite", "Robot", "Train Set", "Board Game"),
    "electronics": ("Headphones", "Charger", "Speaker", "Keyboard", "Webcam"),
    "tools": ("Drill", "Wrench Set", "Level", "Saw", "Multimeter"),
}

# Timestamps are generated from fixed anchors, never from "now", so two builds are identical.
SIGNUP_START = datetime(2021, 1, 1, tzinfo=UTC)
ORDERS_START = datetime(2023, 1, 1, tzinfo=UTC)
ORDERS_END = datetime(2025, 1, 1, tzinfo=UTC)
TIMESTAMP_FORMAT = "%Y-%m-%d %H:%M:%S"


def connect(path: Path) -> sqlite3.Connection:
    """Open ``path`` the way every user of the shop database must: with foreign keys enforced.

    SQLite enforces FOREIGN KEY clauses (and so ON DELETE CASCADE) only on connections that
    switch them on; the setting is not stored in the file.
    """
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA foreign_keys = ON")
    return conn


def build(directory: Path, seed: int = SEED) -> Summary:
    """Create ``directory / DB_FILENAME`` and return a summary of its contents.

    The summary (row counts, total revenue, best customer and product, a hash of the file) is
    computed from the finished database with the same SQL the tests use, so a test can check
    that its private copy starts out exactly as the template was built.
    """
    db_path = directory / DB_FILENAME
    rng = random.Random(seed)
    conn = connect(db_path)
    try:
        # The plugin publishes the directory only after this function returns, so a crash here
        # leaves nothing anyone reads: durability during the load buys nothing and costs a lot.
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.executescript(SCHEMA)
        with conn:  # one transaction for the whole load
            _load(conn, rng)
        for ddl in INDEXES.values():
            conn.execute(ddl)
        # ANALYZE stores planner statistics in the file, so every copy plans queries well
        # without re-analysing; VACUUM leaves a compact, defragmented file that copies fast.
        conn.execute("ANALYZE")
        conn.execute("VACUUM")
        summary = summarize(conn)
    finally:
        conn.close()
    summary["sha256"] = hashlib.sha256(db_path.read_bytes()).hexdigest()
    summary["seed"] = seed
    return summary


def _load(conn: sqlite3.Connection, rng: random.Random) -> None:
    customer_ids = range(1, N_CUSTOMERS + 1)
    countries = [c for c, _ in COUNTRIES]
    country_weights = list(accumulate(w for _, w in COUNTRIES))
    signup_span = int((ORDERS_START - SIGNUP_START).total_seconds())
    customers = []
    for cid, country in zip(
        customer_ids,
        rng.choices(countries, cum_weights=country_weights, k=N_CUSTOMERS),
        strict=True,
    ):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        signed_up = SIGNUP_START + timedelta(seconds=rng.randrange(signup_span))
        customers.append(
            (
                cid,
                f"{first}.{last}.{cid}@example.com".lower(),
                f"{first} {last}",
                country,
                signed_up.strftime(TIMESTAMP_FORMAT),
            )
        )
    conn.executemany("INSERT INTO customers VALUES (?, ?, ?, ?, ?)", customers)

    products = []
    list_price: dict[int, int] = {}
    for pid in range(1, N_PRODUCTS + 1):
        category = rng.choice(CATEGORIES)
        # Log-normal prices: many items around 10-30 dollars, a long tail of expensive ones.
        price = max(99, round(rng.lognormvariate(7.6, 0.9)))
        list_price[pid] = price
        name = f"{rng.choice(ADJECTIVES)} {rng.choice(NOUNS[category])}"
        products.append((pid, f"{category[:3].upper()}-{pid:05d}", name, category, price))
    conn.executemany("INSERT INTO products VALUES (?, ?, ?, ?, ?)", products)

    # Popularity follows a Zipf-like curve over a shuffled ranking, so a few products (and a
    # few heavy buyers) dominate, as in real sales data, without simply being the lowest ids.
    product_rank = list(list_price)
    rng.shuffle(product_rank)
    product_weights = list(accumulate(1 / (rank + 1) ** 0.8 for rank in range(N_PRODUCTS)))
    buyer_rank = list(customer_ids)
    rng.shuffle(buyer_rank)
    buyer_weights = list(accumulate(1 / (rank + 1) ** 0.6 for rank in range(N_CUSTOMERS)))

    statuses = list(STATUS_WEIGHTS)
    status_weights = list(accumulate(STATUS_WEIGHTS.values()))
    order_span = int((ORDERS_END - ORDERS_START).total_seconds())
    buyers = rng.choices(buyer_rank, cum_weights=buyer_weights, k=N_ORDERS)
    order_statuses = rng.choices(statuses, cum_weights=status_weights, k=N_ORDERS)
    orders = []
    items = []
    for oid, (customer_id, status) in enumerate(zip(buyers, order_statuses, strict=True), start=1):
        ordered_at = ORDERS_START + timedelta(seconds=rng.randrange(order_span))
        orders.append((oid, customer_id, status, ordered_at.strftime(TIMESTAMP_FORMAT)))
        n_lines = rng.randint(1, MAX_ITEMS_PER_ORDER)
        picked = rng.choices(product_rank, cum_weights=product_weights, k=n_lines)
        # dict.fromkeys drops repeats but keeps order: (order_id, product_id) is the key.
        for pid in dict.fromkeys(picked):
            discount = rng.choice((100, 100, 100, 95, 90, 80))
            unit_price = list_price[pid] * discount // 100
            items.append((oid, pid, rng.randint(1, 5), unit_price))
    conn.executemany("INSERT INTO orders VALUES (?, ?, ?, ?)", orders)
    # WITHOUT ROWID tables are B-trees on the primary key: inserting in key order is fastest.
    conn.executemany("INSERT INTO order_items VALUES (?, ?, ?, ?)", items)


def summarize(conn: sqlite3.Connection) -> Summary:
    """Facts about the database that tests compare their private copy against."""
    counts = {
        table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
        for table in ("customers", "products", "orders", "order_items")
    }
    top_customer_id, top_customer_cents = top_customers(conn, limit=1)[0]
    top_product_id, top_product_units = top_products(conn, limit=1)[0]
    top_customer_orders = conn.execute(
        "SELECT count(*) FROM orders WHERE customer_id = ?", (top_customer_id,)
    ).fetchone()[0]
    return {
        "counts": counts,
        "revenue_cents": total_revenue(conn),
        "top_customer": {
            "id": top_customer_id,
            "revenue_cents": top_customer_cents,
            "orders": top_customer_orders,
        },
        "top_product": {"id": top_product_id, "units": top_product_units},
    }


# Report queries, shared by summarize() and the tests. Each one is the kind of query a real
# back office runs, and together they touch every table and index.


def total_revenue(conn: sqlite3.Connection) -> int:
    row = conn.execute(
        f"""
        SELECT coalesce(sum(i.quantity * i.unit_price_cents), 0)
        FROM order_items AS i JOIN orders AS o ON o.id = i.order_id
        WHERE o.status IN {REVENUE_STATUSES_SQL}
        """
    ).fetchone()
    return int(row[0])


def revenue_per_customer(conn: sqlite3.Connection) -> dict[int, int]:
    rows = conn.execute(
        f"""
        SELECT o.customer_id, sum(i.quantity * i.unit_price_cents)
        FROM orders AS o JOIN order_items AS i ON i.order_id = o.id
        WHERE o.status IN {REVENUE_STATUSES_SQL}
        GROUP BY o.customer_id
        """
    )
    return dict(rows)


def top_customers(conn: sqlite3.Connection, limit: int) -> list[tuple[int, int]]:
    """(customer_id, revenue_cents), best first; ties broken by id so results are stable."""
    rows = conn.execute(
        f"""
        SELECT o.customer_id, sum(i.quantity * i.unit_price_cents) AS revenue
        FROM orders AS o JOIN order_items AS i ON i.order_id = o.id
        WHERE o.status IN {REVENUE_STATUSES_SQL}
        GROUP BY o.customer_id
        ORDER BY revenue DESC, o.customer_id
        LIMIT ?
        """,
        (limit,),
    )
    return [(int(cid), int(cents)) for cid, cents in rows]


def top_products(conn: sqlite3.Connection, limit: int) -> list[tuple[int, int]]:
    """(product_id, units sold), best first, counting only orders that were paid for."""
    rows = conn.execute(
        f"""
        SELECT i.product_id, sum(i.quantity) AS units
        FROM order_items AS i JOIN orders AS o ON o.id = i.order_id
        WHERE o.status IN {REVENUE_STATUSES_SQL}
        GROUP BY i.product_id
        ORDER BY units DESC, i.product_id
        LIMIT ?
        """,
        (limit,),
    )
    return [(int(pid), int(units)) for pid, units in rows]
