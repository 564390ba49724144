"""Referential integrity and schema checks on the copied database.

The copy must be a complete SQLite database in its own right: constraints, indexes and the
planner statistics from ANALYZE all travel with the file.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import shopdb
from shopdb import Summary

if TYPE_CHECKING:
    from pytest_prewarm import Template


def test_template_handle(shop_template: Template, shop_summary: Summary) -> None:
    assert shop_template.name == "shop_db"
    assert Path(os.fspath(shop_template)) == shop_template.path
    assert (shop_template.path / shopdb.DB_FILENAME).is_file()
    # The value says who built the template: one xdist worker (or "main" without xdist).
    assert isinstance(shop_summary["pid"], int)
    assert shop_summary["built_by"] == "main" or shop_summary["built_by"].startswith("gw")
    assert shop_summary["seed"] == shopdb.SEED


def test_foreign_keys_are_consistent(shop_db: sqlite3.Connection) -> None:
    # PRAGMA foreign_key_check lists every row whose parent is missing; it must list none.
    assert shop_db.execute("PRAGMA foreign_key_check").fetchall() == []


def test_database_file_is_intact(shop_db: sqlite3.Connection) -> None:
    assert shop_db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]


def test_every_order_has_lines(shop_db: sqlite3.Connection) -> None:
    empty_orders = shop_db.execute(
        """
        SELECT count(*) FROM orders AS o
        WHERE NOT EXISTS (SELECT 1 FROM order_items AS i WHERE i.order_id = o.id)
        """
    ).fetchone()[0]
    assert empty_orders == 0


def test_charged_prices_never_exceed_list_price(shop_db: sqlite3.Connection) -> None:
    overcharged, discounted = shop_db.execute(
        """
        SELECT sum(i.unit_price_cents > p.price_cents), sum(i.unit_price_cents < p.price_cents)
        FROM order_items AS i JOIN products AS p ON p.id = i.product_id
        """
    ).fetchone()
    assert overcharged == 0
    assert discounted > 0


def test_indexes_and_statistics_are_in_the_copy(shop_db: sqlite3.Connection) -> None:
    indexes = {
        name
        for (name,) in shop_db.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        )
    }
    assert indexes == set(shopdb.INDEXES)
    assert shop_db.execute("SELECT count(*) FROM sqlite_stat1").fetchone()[0] > 0
    plan = shop_db.execute(
        "EXPLAIN QUERY PLAN SELECT id, status FROM orders WHERE customer_id = ?", (1,)
    ).fetchall()
    assert "USING INDEX orders_customer_id" in " ".join(row[3] for row in plan)


@pytest.mark.parametrize(
    ("statement", "params", "error"),
    [
        pytest.param(
            "INSERT INTO orders (customer_id, status, ordered_at) VALUES (?, 'paid', '2024-06-01')",
            (10**9,),
            "FOREIGN KEY constraint failed",
            id="order-for-unknown-customer",
        ),
        pytest.param(
            "INSERT INTO order_items VALUES (1, 1, ?, 100)",
            (0,),
            "CHECK constraint failed",
            id="zero-quantity",
        ),
        pytest.param(
            "INSERT INTO customers (email, name, country, signed_up_at)"
            " SELECT email, 'Copycat', 'US', '2024-01-01' FROM customers WHERE id = ?",
            (1,),
            "UNIQUE constraint failed: customers.email",
            id="duplicate-email",
        ),
    ],
)
def test_constraints_reject_bad_rows(
    shop_db: sqlite3.Connection, statement: str, params: tuple[Any, ...], error: str
) -> None:
    with pytest.raises(sqlite3.IntegrityError, match=error):
        shop_db.execute(statement, params)


def test_sold_product_cannot_be_deleted(shop_db: sqlite3.Connection, shop_summary: Summary) -> None:
    # ON DELETE RESTRICT: order history must keep pointing at a real product.
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY constraint failed"):
        shop_db.execute("DELETE FROM products WHERE id = ?", (shop_summary["top_product"]["id"],))
