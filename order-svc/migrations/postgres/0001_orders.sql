-- order-svc's store, PostgreSQL dialect (several instances). Times are
-- microseconds since the Unix epoch (BIGINT), so both dialects read them the
-- same way through sqlx's Any driver.
CREATE TABLE orders (
    order_id      TEXT PRIMARY KEY,
    user_id       TEXT NOT NULL,
    request_id    TEXT NOT NULL,
    currency      TEXT NOT NULL,
    total_minor   BIGINT NOT NULL,
    created_at_us BIGINT NOT NULL,
    event_id      TEXT NOT NULL
);
-- ListOrders: one user's orders, newest first.
CREATE INDEX orders_by_user ON orders (user_id, created_at_us DESC, order_id DESC);

CREATE TABLE order_items (
    order_id         TEXT NOT NULL REFERENCES orders (order_id),
    line             BIGINT NOT NULL,
    sku              TEXT NOT NULL,
    quantity         BIGINT NOT NULL,
    unit_price_minor BIGINT NOT NULL,
    PRIMARY KEY (order_id, line)
);

-- (user_id, request_id) is unique: the constraint, not a read, decides which
-- of two concurrent calls creates the order.
CREATE TABLE idempotency_keys (
    user_id       TEXT NOT NULL,
    request_id    TEXT NOT NULL,
    fingerprint   BYTEA NOT NULL,
    order_id      TEXT NOT NULL,
    created_at_us BIGINT NOT NULL,
    PRIMARY KEY (user_id, request_id)
);
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at_us);

-- The transactional outbox: the exact record (key, value, headers) to publish.
CREATE TABLE outbox (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    record_key      TEXT NOT NULL,
    value           BYTEA NOT NULL,
    headers         BYTEA NOT NULL,
    created_at_us   BIGINT NOT NULL,
    lease_until_us  BIGINT NOT NULL,
    published_at_us BIGINT
);
CREATE INDEX outbox_pending ON outbox (id) WHERE published_at_us IS NULL;
CREATE INDEX outbox_pending_by_key ON outbox (record_key, id) WHERE published_at_us IS NULL;
CREATE INDEX outbox_published ON outbox (published_at_us) WHERE published_at_us IS NOT NULL;
