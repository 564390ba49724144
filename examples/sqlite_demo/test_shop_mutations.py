"""Tests that change the database.

Each test works on its own copy, so these run in any order, on any worker, at the same time as
tests that read the very rows being deleted here. The pairs below make that visible: one test
destroys data and its partner, possibly running next to it on another worker, finds the same
data untouched. A shared database would make one of each pair fail, depending on scheduling.
"""

from __future__ import annotations

import hashlib
import sqlite3
from typing import TYPE_CHECKING

import pytest
import shopdb
from shopdb import Summary

if TYPE_CHECKING:
    from pytest_prewarm import Template


def _customer_revenue(conn: sqlite3.Connection, customer_id: int) -> int:
    row = conn.execute(
        f"""
        SELECT coalesce(sum(i.quantity * i.unit_price_cents), 0)
        FROM orders AS o JOIN order_items AS i ON i.order_id = o.id
        WHERE o.customer_id = ? AND o.status IN {shopdb.REVENUE_STATUSES_SQL}
        """,
        (customer_id,),
    ).fetchone()
    return int(row[0])


def _count(conn: sqlite3.Connection, table: str) -> int:
    return int(conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0])


# --- pair 1: the best customer is erased here ... ------------------------------------------


def test_delete_customer_cascades(shop_db: sqlite3.Connection, shop_summary: Summary) -> None:
    top = shop_summary["top_customer"]
    with shop_db:
        deleted = shop_db.execute("DELETE FROM customers WHERE id = ?", (top["id"],)).rowcount
    assert deleted == 1
    # ON DELETE CASCADE removed their orders, and those orders' lines, in the same statement.
    orders_left = shop_db.execute(
        "SELECT count(*) FROM orders WHERE customer_id = ?", (top["id"],)
    ).fetchone()[0]
    assert orders_left == 0
    counts = shop_summary["counts"]
    assert _count(shop_db, "orders") == counts["orders"] - top["orders"]
    assert _count(shop_db, "order_items") < counts["order_items"]
    assert shopdb.total_revenue(shop_db) == shop_summary["revenue_cents"] - top["revenue_cents"]
    assert shop_db.execute("PRAGMA foreign_key_check").fetchall() == []


# --- ... and is still there in this test's copy ---------------------------------------------


def test_top_customer_is_untouched(shop_db: sqlite3.Connection, shop_summary: Summary) -> None:
    top = shop_summary["top_customer"]
    assert shop_db.execute("SELECT 1 FROM customers WHERE id = ?", (top["id"],)).fetchone()
    orders = shop_db.execute(
        "SELECT count(*) FROM orders WHERE customer_id = ?", (top["id"],)
    ).fetchone()[0]
    assert orders == top["orders"]
    assert _customer_revenue(shop_db, top["id"]) == top["revenue_cents"]


# --- pair 2: cancelled orders are purged here; test_row_counts_match_the_build still sees them --


def test_purge_cancelled_orders(shop_db: sqlite3.Connection, shop_summary: Summary) -> None:
    with shop_db:
        purged = shop_db.execute("DELETE FROM orders WHERE status = 'cancelled'").rowcount
    assert purged > 0
    counts = shop_summary["counts"]
    assert _count(shop_db, "orders") == counts["orders"] - purged
    # The cascade took the purged orders' lines with them, and nothing else.
    assert _count(shop_db, "order_items") < counts["order_items"]
    assert _count(shop_db, "customers") == counts["customers"]
    assert shop_db.execute("PRAGMA foreign_key_check").fetchall() == []
    # Cancelled orders were never revenue, so the books do not change.
    assert shopdb.total_revenue(shop_db) == shop_summary["revenue_cents"]


def test_place_order(shop_db: sqlite3.Connection, shop_summary: Summary) -> None:
    customer_id = shop_summary["top_customer"]["id"]
    before = _customer_revenue(shop_db, customer_id)
    lines = {shop_summary["top_product"]["id"]: 3, 1: 1}  # product id -> quantity
    with shop_db:  # the order and its lines commit together or not at all
        order_id = shop_db.execute(
            "INSERT INTO orders (customer_id, status, ordered_at)"
            " VALUES (?, 'paid', '2025-01-15 09:30:00')",
            (customer_id,),
        ).lastrowid
        shop_db.executemany(
            "INSERT INTO order_items SELECT ?, id, ?, price_cents FROM products WHERE id = ?",
            [(order_id, quantity, product_id) for product_id, quantity in lines.items()],
        )
    expected = sum(
        quantity
        * shop_db.execute("SELECT price_cents FROM products WHERE id = ?", (pid,)).fetchone()[0]
        for pid, quantity in lines.items()
    )
    assert order_id == shop_summary["counts"]["orders"] + 1
    assert _customer_revenue(shop_db, customer_id) == before + expected
    assert shopdb.total_revenue(shop_db) == shop_summary["revenue_cents"] + expected


def test_failed_order_rolls_back_completely(
    shop_db: sqlite3.Connection, shop_summary: Summary
) -> None:
    def place_order_with_unknown_product() -> None:
        with shop_db:  # commits on success, rolls back on any exception
            order_id = shop_db.execute(
                "INSERT INTO orders (customer_id, status, ordered_at)"
                " VALUES (1, 'paid', '2025-01-15 09:30:00')"
            ).lastrowid
            shop_db.execute("INSERT INTO order_items VALUES (?, 1, 2, 1500)", (order_id,))
            # No such product: the whole order, lines above included, must be rolled back.
            shop_db.execute("INSERT INTO order_items VALUES (?, ?, 1, 1500)", (order_id, 10**9))

    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY constraint failed"):
        place_order_with_unknown_product()
    assert _count(shop_db, "orders") == shop_summary["counts"]["orders"]
    assert _count(shop_db, "order_items") == shop_summary["counts"]["order_items"]


def test_price_rise_keeps_order_history(shop_db: sqlite3.Connection, shop_summary: Summary) -> None:
    with shop_db:
        repriced = shop_db.execute("UPDATE products SET price_cents = price_cents * 2").rowcount
    assert repriced == shop_summary["counts"]["products"]
    # Lines store the price actually charged, so past revenue does not move.
    assert shopdb.total_revenue(shop_db) == shop_summary["revenue_cents"]


def test_cancel_pending_orders(shop_db: sqlite3.Connection, shop_summary: Summary) -> None:
    with shop_db:
        cancelled = shop_db.execute(
            "UPDATE orders SET status = 'cancelled' WHERE status = 'pending'"
        ).rowcount
    assert cancelled > 0
    pending = shop_db.execute("SELECT count(*) FROM orders WHERE status = 'pending'").fetchone()
    assert pending == (0,)
    # Pending orders were never revenue, so cancelling them changes nothing in the books.
    assert shopdb.total_revenue(shop_db) == shop_summary["revenue_cents"]


def test_template_file_is_never_modified(shop_template: Template, shop_summary: Summary) -> None:
    # However many copies were mutated before this test ran on this worker, the published
    # file is still, byte for byte, what the builder produced.
    digest = hashlib.sha256((shop_template.path / shopdb.DB_FILENAME).read_bytes()).hexdigest()
    assert digest == shop_summary["sha256"]
