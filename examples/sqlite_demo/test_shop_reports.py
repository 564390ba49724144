"""Back-office reports run against each test's private copy of the prewarmed database.

Every expected number comes from the template's value, computed once by the builder: if a copy
differed from the template in any row, these totals would not match.
"""

from __future__ import annotations

import sqlite3

import shopdb
from shopdb import Summary

TABLES = ("customers", "products", "orders", "order_items")


def test_row_counts_match_the_build(shop_db: sqlite3.Connection, shop_summary: Summary) -> None:
    # Mutating tests elsewhere in the run delete and insert rows; none of that reaches this copy.
    counts = {t: shop_db.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}
    assert counts == shop_summary["counts"]
    assert counts["order_items"] > counts["orders"] > counts["customers"] > counts["products"]


def test_revenue_per_customer_adds_up(shop_db: sqlite3.Connection, shop_summary: Summary) -> None:
    per_customer = shopdb.revenue_per_customer(shop_db)
    assert sum(per_customer.values()) == shop_summary["revenue_cents"]
    assert all(cents > 0 for cents in per_customer.values())
    # Some customers signed up and never bought anything; they have no revenue row at all.
    assert len(per_customer) < shop_summary["counts"]["customers"]


def test_top_customers_ranking(shop_db: sqlite3.Connection, shop_summary: Summary) -> None:
    top = shopdb.top_customers(shop_db, limit=10)
    revenues = [cents for _, cents in top]
    assert revenues == sorted(revenues, reverse=True)
    best = shop_summary["top_customer"]
    assert top[0] == (best["id"], best["revenue_cents"])
    # Purchases are skewed towards a few heavy buyers, as in real shops.
    buyers = len(shopdb.revenue_per_customer(shop_db))
    assert revenues[0] > 5 * shop_summary["revenue_cents"] / buyers


def test_top_products_by_units_sold(shop_db: sqlite3.Connection, shop_summary: Summary) -> None:
    top = shopdb.top_products(shop_db, limit=5)
    best = shop_summary["top_product"]
    assert top[0] == (best["id"], best["units"])
    units = [u for _, u in top]
    assert units == sorted(units, reverse=True)
    # Zipf-like popularity: the best seller clearly outsells the fifth.
    assert units[0] > 2 * units[4]


def test_revenue_by_category(shop_db: sqlite3.Connection, shop_summary: Summary) -> None:
    by_category = dict(
        shop_db.execute(
            f"""
            SELECT p.category, sum(i.quantity * i.unit_price_cents)
            FROM order_items AS i
            JOIN orders AS o ON o.id = i.order_id
            JOIN products AS p ON p.id = i.product_id
            WHERE o.status IN {shopdb.REVENUE_STATUSES_SQL}
            GROUP BY p.category
            """
        )
    )
    assert set(by_category) == set(shopdb.CATEGORIES)
    assert sum(by_category.values()) == shop_summary["revenue_cents"]


def test_monthly_revenue_covers_the_order_period(shop_db: sqlite3.Connection) -> None:
    monthly = shop_db.execute(
        f"""
        SELECT strftime('%Y-%m', o.ordered_at) AS month, sum(i.quantity * i.unit_price_cents)
        FROM orders AS o JOIN order_items AS i ON i.order_id = o.id
        WHERE o.status IN {shopdb.REVENUE_STATUSES_SQL}
        GROUP BY month
        ORDER BY month
        """
    ).fetchall()
    # Orders are spread over 2023-2024, so every one of the 24 months has sales.
    assert [month for month, _ in monthly] == [
        f"{year}-{month:02d}" for year in (2023, 2024) for month in range(1, 13)
    ]
    assert all(cents > 0 for _, cents in monthly)


def test_unpaid_orders_bring_no_revenue(shop_db: sqlite3.Connection, shop_summary: Summary) -> None:
    by_status = dict(
        shop_db.execute(
            """
            SELECT o.status, sum(i.quantity * i.unit_price_cents)
            FROM orders AS o JOIN order_items AS i ON i.order_id = o.id
            GROUP BY o.status
            """
        )
    )
    assert set(by_status) == set(shopdb.STATUS_WEIGHTS)
    paid = sum(by_status[s] for s in shopdb.REVENUE_STATUSES)
    assert paid == shop_summary["revenue_cents"]
    assert by_status["pending"] > 0
    assert by_status["cancelled"] > 0
