"""40 tests on a shop database; each has a database of its own, made from the template."""

from __future__ import annotations

import pytest
from conftest import Database
from pg import CUSTOMERS, ITEMS, ORDERS, PRODUCTS


@pytest.mark.parametrize(
    ("table", "rows"),
    [("customers", CUSTOMERS), ("products", PRODUCTS), ("orders", ORDERS), ("order_items", ITEMS)],
)
def test_the_template_holds_every_row(db: Database, table: str, rows: int) -> None:
    assert db.scalar(f"SELECT count(*) FROM {table}") == rows


@pytest.mark.parametrize("country", ["DE", "FR", "NL", "PL"])
def test_customers_are_spread_over_countries(db: Database, country: str) -> None:
    assert db.scalar(f"SELECT count(*) FROM customers WHERE country = '{country}'") == 1250


@pytest.mark.parametrize("customer", range(1, 13))
def test_deleting_a_customers_orders_is_private_to_the_test(db: Database, customer: int) -> None:
    before = db.scalar("SELECT count(*) FROM orders")
    mine = db.scalar(f"SELECT count(*) FROM orders WHERE customer_id = {customer}")

    db.query(f"DELETE FROM orders WHERE customer_id = {customer}")

    assert db.scalar("SELECT count(*) FROM orders") == before - mine
    # Items went with their orders (ON DELETE CASCADE); other tests still see them all.
    assert db.scalar("SELECT count(*) FROM order_items") == ITEMS - 3 * mine


@pytest.mark.parametrize("product", range(1, 11))
def test_a_price_change_shows_in_order_totals(db: Database, product: int) -> None:
    total = (
        "SELECT coalesce(sum(quantity * price_cents), 0)"
        " FROM order_items JOIN products ON id = product_id"
    )
    before = db.scalar(total)
    quantity = db.scalar(
        f"SELECT coalesce(sum(quantity), 0) FROM order_items WHERE product_id = {product}"
    )

    db.query(f"UPDATE products SET price_cents = price_cents + 1 WHERE id = {product}")

    assert db.scalar(total) == before + quantity


@pytest.mark.parametrize("email", ["customer1@example.com", "customer5000@example.com"])
def test_emails_are_unique(db: Database, email: str) -> None:
    with pytest.raises(RuntimeError, match="duplicate key value violates unique constraint"):
        db.query(f"INSERT INTO customers VALUES (99999, '{email}', 'DE')")


@pytest.mark.parametrize("price", [0, -5])
def test_prices_must_be_positive(db: Database, price: int) -> None:
    with pytest.raises(RuntimeError, match="violates check constraint"):
        db.query(f"INSERT INTO products VALUES (99999, 'free', {price})")


@pytest.mark.parametrize("month", range(1, 7))
def test_orders_per_month_add_up(db: Database, month: int) -> None:
    counts = db.query(
        "SELECT extract(month FROM placed_on)::int, count(*) FROM orders GROUP BY 1 ORDER BY 1"
    )
    assert sum(int(c) for _, c in counts) == ORDERS
    assert dict((int(m), int(c)) for m, c in counts)[month] > 0
