//! The order store: orders, their items, idempotency keys and the outbox, in
//! SQLite (one file, the default) or PostgreSQL (several instances), chosen by
//! `DATABASE_URL`.
//!
//! Why sqlx: it is the most used async SQL crate on tokio, maintained, with
//! native drivers for both databases (SQLite bundled, so the embedded store
//! needs nothing installed), a connection pool, and versioned migrations
//! embedded in the binary at build time. Its `Any` driver lets one set of
//! queries serve both databases, so every code path is the same on both and
//! only the schema files and one locking clause differ. The compile-time
//! checked `query!` macros are not used: they need a live database (or
//! generated offline data) to build the crate; the queries are exercised by the
//! tests against both databases instead. Only `migrate!` (which reads the
//! migration files, not a database) is used.
//!
//! Times are microseconds since the Unix epoch, so an order read back has
//! exactly the `created_at` it was answered with.

use std::{sync::Arc, time::Duration};

use orders_contract::v1::{LineItem, Order};
use service_kit::secret::Secret;
use sqlx::{
    Any, AnyConnection, Row,
    any::{AnyArguments, AnyPoolOptions, AnyRow},
    migrate::{MigrateError, Migrator},
    pool::PoolOptions,
    query::Query,
};
use tokio::sync::{Mutex, mpsc, oneshot};

use crate::error::Error;

/// The migrations of each dialect, embedded at build time.
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");

/// How long a call waits for a connection before the store counts as down.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(3);
/// Most orders one SQLite group commit writes.
const GROUP_COMMIT_MAX: usize = 256;

/// Which database `DATABASE_URL` names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite://<path>`: one file, one instance.
    Sqlite,
    /// `postgres://...`: shared by several instances.
    Postgres,
}

impl Backend {
    /// The backend of `url`, or why it has none.
    pub fn of(url: &str) -> Result<Self, Error> {
        if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            check_postgres_tls(url)?;
            Ok(Backend::Postgres)
        } else {
            Err(Error::Config(
                "DATABASE_URL must start with sqlite:// or postgres://".into(),
            ))
        }
    }

    /// Appends `n` statement parameters, comma-separated, the first being
    /// parameter `first`: `?` for SQLite, which numbers them by position,
    /// `$first, ...` for PostgreSQL. SQLite reads `$n` as a name and looks each
    /// name up in a list when it prepares the statement and again when sqlx
    /// binds it, a cost that grows with the square of the parameters: a
    /// group's statements have hundreds.
    fn push_params(self, sql: &mut String, first: usize, n: usize) {
        use std::fmt::Write as _;
        for i in first..first + n {
            if i > first {
                sql.push_str(", ");
            }
            match self {
                Backend::Sqlite => sql.push('?'),
                Backend::Postgres => {
                    let _ = write!(sql, "${i}");
                }
            }
        }
    }

    /// `n` parameters from `first`, as [`Backend::push_params`] writes them.
    fn params(self, first: usize, n: usize) -> String {
        let mut sql = String::with_capacity(n * 4);
        self.push_params(&mut sql, first, n);
        sql
    }
}

/// The `sslmode` values libpq (and sqlx, built with rustls) knows.
const SSL_MODES: [&str; 6] = ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"];

/// Checks a PostgreSQL URL's TLS parameters before connecting, so a typo is
/// named as such instead of surfacing as a connection failure; the URL itself
/// is never shown (it may carry a password).
fn check_postgres_tls(url: &str) -> Result<(), Error> {
    let Some((_, query)) = url.split_once('?') else {
        return Ok(());
    };
    for (key, value) in query.split('&').filter_map(|pair| pair.split_once('=')) {
        match key {
            "sslmode" | "ssl-mode" if !SSL_MODES.contains(&value.to_ascii_lowercase().as_str()) => {
                return Err(Error::Config(format!(
                    "DATABASE_URL: {key}={value:?} is not one of {}",
                    SSL_MODES.join(", ")
                )));
            }
            "sslrootcert" | "ssl-root-cert" if !std::path::Path::new(value).is_file() => {
                return Err(Error::Config(format!(
                    "DATABASE_URL: {key}={value:?} is not a readable file"
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// An order as stored: the order itself and its event's id.
#[derive(Debug, Clone)]
pub struct StoredOrder<'a> {
    /// The order (its `created_at` already at microsecond precision).
    pub order: &'a Order,
    /// The `OrderCreated` event id.
    pub event_id: &'a str,
    /// The payload's fingerprint, when the call carried a `request_id`.
    pub fingerprint: Option<&'a [u8]>,
}

/// One record of the outbox, exactly as it goes to the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    /// The record key (the order id).
    pub key: String,
    /// The record value (the encoded event).
    pub value: Vec<u8>,
    /// The headers, in order.
    pub headers: Vec<(String, String)>,
}

impl OutboxRecord {
    /// The headers as one blob: per header a u32 name length, the name, a
    /// u32 value length, the value (big-endian lengths).
    fn encode_headers(&self) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in &self.headers {
            for part in [name.as_bytes(), value.as_bytes()] {
                out.extend_from_slice(&u32::try_from(part.len()).unwrap_or(u32::MAX).to_be_bytes());
                out.extend_from_slice(part);
            }
        }
        out
    }

    /// The inverse of [`Self::encode_headers`]; `None` if `blob` is not one.
    fn decode_headers(mut blob: &[u8]) -> Option<Vec<(String, String)>> {
        let mut headers = Vec::new();
        let take = |blob: &mut &[u8]| -> Option<String> {
            let (len, rest) = blob.split_first_chunk::<4>()?;
            let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
            if rest.len() < len {
                return None;
            }
            let (text, rest) = rest.split_at(len);
            *blob = rest;
            String::from_utf8(text.to_vec()).ok()
        };
        while !blob.is_empty() {
            let name = take(&mut blob)?;
            let value = take(&mut blob)?;
            headers.push((name, value));
        }
        Some(headers)
    }
}

/// An outbox row claimed for publishing.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The row id (commit order within a key).
    pub id: i64,
    /// What to publish.
    pub record: OutboxRecord,
}

/// What [`Store::create`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Created {
    /// The order is committed; its outbox row has this id.
    New(i64),
    /// The idempotency key is taken (by a committed order): read it back.
    KeyTaken,
}

/// An idempotency key found in the store.
#[derive(Debug, Clone)]
pub struct KeyRow {
    /// The fingerprint of the payload that created the order.
    pub fingerprint: Vec<u8>,
    /// The order it names.
    pub order_id: String,
}

/// How many rows the outbox holds that are not yet acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutboxStats {
    /// Rows not yet acknowledged by the broker.
    pub pending: i64,
    /// When the oldest of them was committed (µs since the epoch).
    pub oldest_us: Option<i64>,
}

/// The store.
#[derive(Debug)]
pub struct Store {
    pool: sqlx::AnyPool,
    backend: Backend,
    /// SQLite's writer: every write runs on this one connection, in turn,
    /// and the pool serves reads. Writes take turns here instead of in
    /// SQLite's busy handler, which sleeps up to 100 ms between tries. And a
    /// connection keeps its page cache only while no other connection
    /// writes: with every write on one connection, the pages writes touch
    /// (the ends of the tables and indexes) stay cached between transactions
    /// instead of being read back for each, and one cache holds them, not
    /// one per pooled connection.
    writer: Option<Arc<Mutex<AnyConnection>>>,
    /// SQLite's orders go through one group commit ([`group_commit`]): its
    /// statements run in-process and cost little beside the fsync of each
    /// commit, so sharing the commit is what raises its rate. PostgreSQL
    /// keeps a transaction per call: its statements are round trips, which
    /// one committing task would serialize, while its connections commit
    /// in parallel and the server already shares their WAL flushes.
    creates: Option<mpsc::Sender<PendingCreate>>,
}

/// What [`Store::create`] writes, owned so that a group commit can carry it.
#[derive(Debug)]
struct OrderWrite {
    order: Order,
    event_id: String,
    fingerprint: Option<Vec<u8>>,
    record: OutboxRecord,
    lease_until_us: i64,
    not_before_us: i64,
}

/// An order waiting for its group commit, and where its outcome goes.
#[derive(Debug)]
struct PendingCreate {
    write: OrderWrite,
    done: oneshot::Sender<Result<Created, Error>>,
}

/// Microseconds since the epoch, now.
pub fn now_us() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1000).unwrap_or(i64::MAX)
}

/// A protobuf timestamp from microseconds since the epoch.
pub fn timestamp_from_us(us: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: us.div_euclid(1_000_000),
        nanos: i32::try_from(us.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

/// Microseconds since the epoch of a protobuf timestamp.
pub fn us_from_timestamp(t: &prost_types::Timestamp) -> i64 {
    t.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(t.nanos / 1000))
}

impl Store {
    /// Connects to `url` (creating an SQLite file when missing) and applies
    /// the migrations this binary has. A database that a newer binary has
    /// migrated further is refused: this binary would not know its schema.
    pub async fn connect(url: &Secret, max_connections: u32) -> Result<Self, Error> {
        sqlx::any::install_default_drivers();
        let backend = Backend::of(url.expose())?;
        let mut url = url.expose().to_owned();
        let options: AnyPoolOptions = PoolOptions::new()
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .test_before_acquire(true);
        let options = match backend {
            Backend::Sqlite => {
                if !url.contains("mode=") {
                    url.push_str(if url.contains('?') { "&mode=rwc" } else { "?mode=rwc" });
                }
                // WAL: readers never wait for the writer. synchronous=FULL:
                // a commit is on disk (WAL fsynced) before CreateOrder
                // answers, so an OK survives a power loss, not only a crash.
                // temp_store=MEMORY: a statement that may fail half-way
                // inside a transaction (a group's multi-row INSERTs) keeps
                // its rollback journal in memory, not in a temporary file
                // written page by page.
                options
                    .max_connections(max_connections.clamp(1, 8))
                    .after_connect(|conn, _| {
                        Box::pin(async move {
                            for pragma in [
                                "PRAGMA journal_mode = WAL",
                                "PRAGMA synchronous = FULL",
                                "PRAGMA busy_timeout = 5000",
                                "PRAGMA foreign_keys = ON",
                                "PRAGMA temp_store = MEMORY",
                            ] {
                                sqlx::query(pragma).execute(&mut *conn).await?;
                            }
                            Ok(())
                        })
                    })
            }
            Backend::Postgres => options.max_connections(max_connections.max(1)),
        };
        let pool = options
            .connect(&url)
            .await
            .map_err(|e| Error::StoreConnect(e.to_string()))?;
        let migrator = match backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        let known = migrator.iter().map(|m| m.version).max().unwrap_or(0);
        migrator.run(&pool).await.map_err(|e| match e {
            MigrateError::VersionMissing(found) => Error::StoreTooNew { found, known },
            other => Error::Migrate(other.to_string()),
        })?;
        let writer = match backend {
            Backend::Sqlite => {
                // Out of the pool, with the pool's connection settings.
                let conn = pool.acquire().await.map_err(|e| Error::StoreConnect(e.to_string()))?;
                Some(Arc::new(Mutex::new(conn.detach())))
            }
            Backend::Postgres => None,
        };
        let creates = writer.clone().map(|writer| {
            let (creates, queue) = mpsc::channel(GROUP_COMMIT_MAX * 4);
            tokio::spawn(group_commit(writer, queue));
            creates
        });
        Ok(Self {
            pool,
            backend,
            writer,
            creates,
        })
    }

    /// Which database this is.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The newest schema version this binary knows.
    pub fn schema_version(&self) -> i64 {
        let migrator = match self.backend {
            Backend::Sqlite => &SQLITE_MIGRATIONS,
            Backend::Postgres => &POSTGRES_MIGRATIONS,
        };
        migrator.iter().map(|m| m.version).max().unwrap_or(0)
    }

    /// Runs `query`, a write, and returns its rows: on SQLite on the writer
    /// in its turn, on PostgreSQL on the pool.
    async fn write<'q>(&self, query: Query<'q, Any, AnyArguments<'q>>) -> Result<Vec<AnyRow>, Error> {
        Ok(match &self.writer {
            Some(writer) => query.fetch_all(&mut *writer.lock().await).await?,
            None => query.fetch_all(&self.pool).await?,
        })
    }

    /// Runs `query`, a write, and returns how many rows it changed.
    async fn execute<'q>(&self, query: Query<'q, Any, AnyArguments<'q>>) -> Result<u64, Error> {
        Ok(match &self.writer {
            Some(writer) => query.execute(&mut *writer.lock().await).await?,
            None => query.execute(&self.pool).await?,
        }
        .rows_affected())
    }

    /// Whether the store answers.
    pub async fn ping(&self) -> Result<(), Error> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// The idempotency key `(user_id, request_id)` if it was taken at or
    /// after `not_before_us`.
    pub async fn find_key(&self, user_id: &str, request_id: &str, not_before_us: i64) -> Result<Option<KeyRow>, Error> {
        let row = sqlx::query(
            "SELECT fingerprint, order_id FROM idempotency_keys \
             WHERE user_id = $1 AND request_id = $2 AND created_at_us >= $3",
        )
        .bind(user_id)
        .bind(request_id)
        .bind(not_before_us)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| {
            Ok(KeyRow {
                fingerprint: row.try_get("fingerprint")?,
                order_id: row.try_get("order_id")?,
            })
        })
        .transpose()
    }

    /// In one transaction: the idempotency key (unless it is taken by a key
    /// newer than `not_before_us`: then nothing is written), the order, its
    /// items and its outbox record, leased until `lease_until_us` to the
    /// call that publishes it right after the commit.
    pub async fn create(
        &self,
        stored: &StoredOrder<'_>,
        record: &OutboxRecord,
        lease_until_us: i64,
        not_before_us: i64,
    ) -> Result<Created, Error> {
        let write = OrderWrite {
            order: stored.order.clone(),
            event_id: stored.event_id.to_owned(),
            fingerprint: stored.fingerprint.map(<[u8]>::to_vec),
            record: record.clone(),
            lease_until_us,
            not_before_us,
        };
        let Some(creates) = &self.creates else {
            return write_in_transaction(&self.pool, self.backend, &[&write])
                .await
                .map(|mut one| one.remove(0));
        };
        let closed = || Error::StoreCommit("the store is closing".into());
        let (done, outcome) = oneshot::channel();
        creates
            .send(PendingCreate { write, done })
            .await
            .map_err(|_| closed())?;
        outcome.await.map_err(|_| closed())?
    }

    /// The order `order_id`, with its items.
    pub async fn get(&self, order_id: &str) -> Result<Option<Order>, Error> {
        let row = sqlx::query(
            "SELECT order_id, user_id, request_id, currency, total_minor, created_at_us \
             FROM orders WHERE order_id = $1",
        )
        .bind(order_id)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else { return Ok(None) };
        let mut orders = vec![order_from_row(&row)?];
        self.fill_items(&mut orders).await?;
        Ok(orders.pop())
    }

    /// At most `limit` of `user_id`'s orders, newest first, strictly after
    /// the position `after` (`created_at` in µs and order id) in that order.
    pub async fn list(&self, user_id: &str, after: Option<(i64, &str)>, limit: u32) -> Result<Vec<Order>, Error> {
        let (before_us, before_id) = after.unwrap_or((i64::MAX, ""));
        let rows = sqlx::query(
            "SELECT order_id, user_id, request_id, currency, total_minor, created_at_us FROM orders \
             WHERE user_id = $1 AND (created_at_us < $2 OR (created_at_us = $2 AND order_id < $3)) \
             ORDER BY created_at_us DESC, order_id DESC LIMIT $4",
        )
        .bind(user_id)
        .bind(before_us)
        .bind(before_id)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        let mut orders = rows.iter().map(order_from_row).collect::<Result<Vec<_>, _>>()?;
        self.fill_items(&mut orders).await?;
        Ok(orders)
    }

    async fn fill_items(&self, orders: &mut [Order]) -> Result<(), Error> {
        if orders.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "SELECT order_id, sku, quantity, unit_price_minor FROM order_items \
             WHERE order_id IN ({}) ORDER BY order_id, line",
            self.backend.params(1, orders.len())
        );
        let mut query = sqlx::query(&sql);
        for order in orders.iter() {
            query = query.bind(order.order_id.clone());
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut by_id: std::collections::HashMap<String, Vec<LineItem>> = std::collections::HashMap::new();
        for row in rows {
            let quantity: i64 = row.try_get("quantity")?;
            by_id.entry(row.try_get("order_id")?).or_default().push(LineItem {
                sku: row.try_get("sku")?,
                quantity: u32::try_from(quantity).unwrap_or(u32::MAX),
                unit_price_minor: row.try_get("unit_price_minor")?,
            });
        }
        for order in orders {
            order.items = by_id.remove(&order.order_id).unwrap_or_default();
        }
        Ok(())
    }

    /// Claims at most `limit` unpublished rows whose lease has expired, each
    /// the oldest unpublished row of its key (so a key's rows go out in
    /// order), leasing them until `lease_until_us`. On PostgreSQL, rows that
    /// another instance is claiming at the same moment are skipped
    /// (`FOR UPDATE SKIP LOCKED`), so one instance publishes each row.
    pub async fn claim(&self, now_us: i64, lease_until_us: i64, limit: u32) -> Result<Vec<Claimed>, Error> {
        let lock = match self.backend {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE outbox SET lease_until_us = $1 WHERE id IN ( \
               SELECT o.id FROM outbox o \
               WHERE o.published_at_us IS NULL AND o.lease_until_us < $2 \
                 AND NOT EXISTS (SELECT 1 FROM outbox p \
                   WHERE p.record_key = o.record_key AND p.published_at_us IS NULL AND p.id < o.id) \
               ORDER BY o.id LIMIT $3 {lock}) \
             RETURNING id, record_key, value, headers"
        );
        let rows = self
            .write(
                sqlx::query(&sql)
                    .bind(lease_until_us)
                    .bind(now_us)
                    .bind(i64::from(limit)),
            )
            .await?;
        let mut claimed = rows
            .iter()
            .map(|row| {
                let headers: Vec<u8> = row.try_get("headers")?;
                Ok(Claimed {
                    id: row.try_get("id")?,
                    record: OutboxRecord {
                        key: row.try_get("record_key")?,
                        value: row.try_get("value")?,
                        headers: OutboxRecord::decode_headers(&headers)
                            .ok_or_else(|| Error::Corrupt("an outbox row's headers do not decode".into()))?,
                    },
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        claimed.sort_by_key(|c| c.id);
        Ok(claimed)
    }

    /// Marks `ids` as acknowledged by the broker at `at_us`.
    pub async fn mark_published(&self, ids: &[i64], at_us: i64) -> Result<(), Error> {
        self.update_ids("published_at_us", at_us, ids).await
    }

    /// Hands `ids` back to the relay at once (their publish failed).
    pub async fn release(&self, ids: &[i64]) -> Result<(), Error> {
        self.update_ids("lease_until_us", 0, ids).await
    }

    async fn update_ids(&self, column: &str, value: i64, ids: &[i64]) -> Result<(), Error> {
        for chunk in ids.chunks(500) {
            let sql = format!(
                "UPDATE outbox SET {column} = {} WHERE id IN ({})",
                self.backend.params(1, 1),
                self.backend.params(2, chunk.len())
            );
            let mut query = sqlx::query(&sql).bind(value);
            for id in chunk {
                query = query.bind(*id);
            }
            self.execute(query).await?;
        }
        Ok(())
    }

    /// Ends every lease: for SQLite at start-up, where this process is the
    /// only one using the file, so whatever a previous process had leased
    /// and not published goes out now rather than when the lease expires.
    pub async fn release_all(&self) -> Result<u64, Error> {
        self.execute(sqlx::query(
            "UPDATE outbox SET lease_until_us = 0 WHERE published_at_us IS NULL AND lease_until_us > 0",
        ))
        .await
    }

    /// The unpublished rows: how many, and the oldest one's commit time.
    pub async fn outbox_stats(&self) -> Result<OutboxStats, Error> {
        let row = sqlx::query(
            "SELECT COUNT(*) AS pending, MIN(created_at_us) AS oldest FROM outbox WHERE published_at_us IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(OutboxStats {
            pending: row.try_get("pending")?,
            oldest_us: row.try_get("oldest")?,
        })
    }

    /// Deletes (in bounded batches) outbox rows published before
    /// `published_before_us` and idempotency keys taken before
    /// `keys_before_us`. Returns how many rows went.
    pub async fn purge(&self, published_before_us: i64, keys_before_us: i64) -> Result<u64, Error> {
        let mut removed = 0;
        for sql in [
            "DELETE FROM outbox WHERE id IN (SELECT id FROM outbox \
               WHERE published_at_us IS NOT NULL AND published_at_us < $1 LIMIT 5000)",
            "DELETE FROM idempotency_keys WHERE (user_id, request_id) IN (SELECT user_id, request_id \
               FROM idempotency_keys WHERE created_at_us < $1 LIMIT 5000)",
        ] {
            let before = if sql.contains("outbox") {
                published_before_us
            } else {
                keys_before_us
            };
            loop {
                let n = self.execute(sqlx::query(sql).bind(before)).await?;
                removed += n;
                if n < 5000 {
                    break;
                }
            }
        }
        Ok(removed)
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Most values one statement binds: SQLite's limit (32,766) with room to
/// spare, below PostgreSQL's (65,535).
const MAX_BINDS: usize = 30_000;

/// `{head} VALUES ($1, ..., $width), (...), ...{tail}`: `rows` rows of
/// `width` parameters, as `backend` writes them.
fn insert_sql(backend: Backend, head: &str, width: usize, rows: usize, tail: &str) -> String {
    let mut sql = String::with_capacity(head.len() + tail.len() + 16 + rows * (width * 6 + 4));
    sql.push_str(head);
    sql.push_str(" VALUES ");
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        backend.push_params(&mut sql, row * width + 1, width);
        sql.push(')');
    }
    sql.push_str(tail);
    sql
}

/// Writes `writes` (each order's idempotency key unless taken, the order,
/// its items and its outbox record) on `conn`, inside the caller's
/// transaction, and says what became of each, in order. Each table gets
/// one statement for all the orders (more only past [`MAX_BINDS`]): every
/// statement is a hand-off to the connection's thread, so a group commit
/// costs a few of them, not a few per order. A statement that fails fails
/// the whole transaction.
async fn write_orders(
    conn: &mut AnyConnection,
    backend: Backend,
    writes: &[&OrderWrite],
) -> Result<Vec<Created>, Error> {
    let created_at_us = |write: &OrderWrite| {
        write
            .order
            .created_at
            .as_ref()
            .map(us_from_timestamp)
            .unwrap_or_default()
    };
    // A statement for one order is the same every time and stays prepared
    // in the connection's cache; a group's statements differ in size with
    // the group, and large cached programs would hold memory for nothing.
    let cached = writes.len() == 1;
    let keyed: Vec<&OrderWrite> = writes.iter().copied().filter(|w| w.fingerprint.is_some()).collect();
    let mut keys_won = std::collections::HashSet::new();
    for chunk in keyed.chunks(MAX_BINDS / 5) {
        // An expired key names an old order; the new one takes its place.
        let mut sql = String::from("DELETE FROM idempotency_keys WHERE ");
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(" OR ");
            }
            sql.push_str("(user_id = ");
            backend.push_params(&mut sql, i * 3 + 1, 1);
            sql.push_str(" AND request_id = ");
            backend.push_params(&mut sql, i * 3 + 2, 1);
            sql.push_str(" AND created_at_us < ");
            backend.push_params(&mut sql, i * 3 + 3, 1);
            sql.push(')');
        }
        let mut delete = sqlx::query(&sql).persistent(cached);
        for write in chunk {
            delete = delete
                .bind(&write.order.user_id)
                .bind(&write.order.request_id)
                .bind(write.not_before_us);
        }
        delete.execute(&mut *conn).await?;
        // The constraint decides: of two orders with one key (in the store
        // or in this statement) the first keeps it.
        let sql = insert_sql(
            backend,
            "INSERT INTO idempotency_keys (user_id, request_id, fingerprint, order_id, created_at_us)",
            5,
            chunk.len(),
            " ON CONFLICT (user_id, request_id) DO NOTHING RETURNING order_id",
        );
        let mut insert = sqlx::query(&sql).persistent(cached);
        for write in chunk {
            insert = insert
                .bind(&write.order.user_id)
                .bind(&write.order.request_id)
                .bind(write.fingerprint.clone())
                .bind(&write.order.order_id)
                .bind(created_at_us(write));
        }
        for row in insert.fetch_all(&mut *conn).await? {
            keys_won.insert(row.try_get::<String, _>("order_id")?);
        }
    }
    let new: Vec<&OrderWrite> = writes
        .iter()
        .copied()
        .filter(|w| w.fingerprint.is_none() || keys_won.contains(&w.order.order_id))
        .collect();

    for chunk in new.chunks(MAX_BINDS / 7) {
        let sql = insert_sql(
            backend,
            "INSERT INTO orders (order_id, user_id, request_id, currency, total_minor, created_at_us, event_id)",
            7,
            chunk.len(),
            "",
        );
        let mut insert = sqlx::query(&sql).persistent(cached);
        for write in chunk {
            let order = &write.order;
            insert = insert
                .bind(&order.order_id)
                .bind(&order.user_id)
                .bind(&order.request_id)
                .bind(&order.currency)
                .bind(order.total_minor)
                .bind(created_at_us(write))
                .bind(&write.event_id);
        }
        insert.execute(&mut *conn).await?;
    }

    let items: Vec<(&str, i64, &LineItem)> = new
        .iter()
        .flat_map(|w| {
            let order_id = w.order.order_id.as_str();
            (0_i64..)
                .zip(&w.order.items)
                .map(move |(line, item)| (order_id, line, item))
        })
        .collect();
    for chunk in items.chunks(MAX_BINDS / 5) {
        let sql = insert_sql(
            backend,
            "INSERT INTO order_items (order_id, line, sku, quantity, unit_price_minor)",
            5,
            chunk.len(),
            "",
        );
        let mut insert = sqlx::query(&sql).persistent(cached);
        for (order_id, line, item) in chunk {
            insert = insert
                .bind(*order_id)
                .bind(*line)
                .bind(&item.sku)
                .bind(i64::from(item.quantity))
                .bind(item.unit_price_minor);
        }
        insert.execute(&mut *conn).await?;
    }

    // Rows come back in no promised order: each is matched by its key,
    // the order id, unique in the batch since the orders were inserted.
    let mut outbox_ids = std::collections::HashMap::with_capacity(new.len());
    let committed_us = now_us();
    for chunk in new.chunks(MAX_BINDS / 5) {
        let sql = insert_sql(
            backend,
            "INSERT INTO outbox (record_key, value, headers, created_at_us, lease_until_us)",
            5,
            chunk.len(),
            " RETURNING id, record_key",
        );
        let mut insert = sqlx::query(&sql).persistent(cached);
        for write in chunk {
            insert = insert
                .bind(&write.record.key)
                .bind(write.record.value.clone())
                .bind(write.record.encode_headers())
                .bind(committed_us)
                .bind(write.lease_until_us);
        }
        for row in insert.fetch_all(&mut *conn).await? {
            outbox_ids.insert(row.try_get::<String, _>("record_key")?, row.try_get::<i64, _>("id")?);
        }
    }
    writes
        .iter()
        .map(|w| {
            if w.fingerprint.is_some() && !keys_won.contains(&w.order.order_id) {
                return Ok(Created::KeyTaken);
            }
            outbox_ids
                .get(&w.record.key)
                .map(|id| Created::New(*id))
                .ok_or_else(|| Error::StoreCommit(format!("no outbox row came back for order {}", w.order.order_id)))
        })
        .collect()
}

/// SQLite's one writer commits the orders waiting for it together: one
/// transaction and one fsync for all of them instead of one each, so the
/// embedded store's rate is not bounded by one disk flush per order. The
/// task ends when the store is dropped.
async fn group_commit(writer: Arc<Mutex<AnyConnection>>, mut queue: mpsc::Receiver<PendingCreate>) {
    let mut group = Vec::with_capacity(GROUP_COMMIT_MAX);
    while queue.recv_many(&mut group, GROUP_COMMIT_MAX).await > 0 {
        let outcomes = write_group(&mut *writer.lock().await, &group).await;
        for (pending, outcome) in group.drain(..).zip(outcomes) {
            // A call that gave up waiting has dropped its receiver; its order
            // is committed all the same, as after a timeout.
            let _ = pending.done.send(outcome);
        }
    }
}

/// Writes `group` in one transaction. Writes rarely fail, and when one
/// does the group is rolled back and each order written in a transaction
/// of its own, so a failing order fails only itself; the common path pays
/// no savepoint per order.
async fn write_group(writer: &mut AnyConnection, group: &[PendingCreate]) -> Vec<Result<Created, Error>> {
    let writes: Vec<&OrderWrite> = group.iter().map(|pending| &pending.write).collect();
    match write_in_transaction(&mut *writer, Backend::Sqlite, &writes).await {
        Ok(created) => created.into_iter().map(Ok).collect(),
        Err(error) => {
            tracing::warn!(%error, orders = group.len(), "group commit failed; writing its orders one by one");
            let mut outcomes = Vec::with_capacity(group.len());
            for write in writes {
                outcomes.push(
                    write_in_transaction(&mut *writer, Backend::Sqlite, &[write])
                        .await
                        .map(|mut one| one.remove(0)),
                );
            }
            outcomes
        }
    }
}

/// `writes` in one transaction on `conn` (a connection or the pool), all
/// or none of them.
async fn write_in_transaction<'c>(
    conn: impl sqlx::Acquire<'c, Database = Any>,
    backend: Backend,
    writes: &[&OrderWrite],
) -> Result<Vec<Created>, Error> {
    let mut tx = conn.begin().await?;
    match write_orders(&mut tx, backend, writes).await {
        Ok(created) => {
            tx.commit().await?;
            Ok(created)
        }
        Err(error) => {
            let _ = tx.rollback().await;
            Err(error)
        }
    }
}

fn order_from_row(row: &AnyRow) -> Result<Order, Error> {
    let created_at_us: i64 = row.try_get("created_at_us")?;
    Ok(Order {
        order_id: row.try_get("order_id")?,
        user_id: row.try_get("user_id")?,
        items: Vec::new(),
        currency: row.try_get("currency")?,
        total_minor: row.try_get("total_minor")?,
        created_at: Some(timestamp_from_us(created_at_us)),
        request_id: row.try_get("request_id")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SQLite's statements number their parameters by position, PostgreSQL's
    /// by `$n`, in the same order.
    #[test]
    fn parameters_are_positional_for_sqlite_and_numbered_for_postgres() {
        let head = "INSERT INTO t (a, b)";
        assert_eq!(
            insert_sql(Backend::Sqlite, head, 2, 3, " RETURNING a"),
            "INSERT INTO t (a, b) VALUES (?, ?), (?, ?), (?, ?) RETURNING a"
        );
        assert_eq!(
            insert_sql(Backend::Postgres, head, 2, 3, ""),
            "INSERT INTO t (a, b) VALUES ($1, $2), ($3, $4), ($5, $6)"
        );
        assert_eq!(Backend::Postgres.params(4, 2), "$4, $5");
        assert_eq!(Backend::Sqlite.params(4, 2), "?, ?");
    }

    #[test]
    fn headers_round_trip_and_garbage_is_refused() {
        let record = OutboxRecord {
            key: "k".into(),
            value: vec![1, 2],
            headers: vec![("ce_id".into(), "1".into()), ("traceparent".into(), String::new())],
        };
        let blob = record.encode_headers();
        assert_eq!(OutboxRecord::decode_headers(&blob), Some(record.headers));
        assert_eq!(OutboxRecord::decode_headers(&blob[..blob.len() - 1]), None);
        assert_eq!(OutboxRecord::decode_headers(&[0, 0, 0, 9, b'a']), None);
    }

    fn order(order_id: &str, request_id: &str) -> Order {
        Order {
            order_id: order_id.into(),
            user_id: "u".into(),
            request_id: request_id.into(),
            currency: "EUR".into(),
            total_minor: 100,
            created_at: Some(timestamp_from_us(1_700_000_000_000_000)),
            items: vec![LineItem {
                sku: "s".into(),
                quantity: 1,
                unit_price_minor: 100,
            }],
        }
    }

    async fn create(store: &Store, order: &Order) -> Result<Created, Error> {
        let record = OutboxRecord {
            key: order.order_id.clone(),
            value: vec![1],
            headers: vec![],
        };
        let fingerprint = (!order.request_id.is_empty()).then_some(order.request_id.as_bytes());
        let stored = StoredOrder {
            order,
            event_id: &order.order_id,
            fingerprint,
        };
        store.create(&stored, &record, 0, 0).await
    }

    /// Polls `ready` every millisecond until it holds, failing after 10 s.
    async fn wait_until(ready: impl Fn() -> bool, what: &str) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !ready() {
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting: {what}");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    async fn sqlite_store(dir: &tempfile::TempDir) -> Arc<Store> {
        let url: Secret = format!("sqlite://{}", dir.path().join("orders.db").display())
            .parse()
            .unwrap();
        Arc::new(Store::connect(&url, 4).await.unwrap())
    }

    /// Creates `orders` concurrently as one group commit, and returns each
    /// one's outcome: with the writer's turn held, the committing task takes
    /// a first order and waits for the turn; `orders` queue up behind it and
    /// become the next group.
    async fn create_as_one_group(store: &Arc<Store>, orders: &[Order]) -> Vec<Result<Created, Error>> {
        let creates = store.creates.clone().unwrap();
        let queued = || creates.max_capacity() - creates.capacity();
        let turn = store.writer.as_ref().unwrap().clone().lock_owned().await;
        let first = order(&uuid::Uuid::now_v7().to_string(), "");
        let (done, first_outcome) = oneshot::channel();
        let write = OrderWrite {
            order: first.clone(),
            event_id: first.order_id.clone(),
            fingerprint: None,
            record: OutboxRecord {
                key: first.order_id.clone(),
                value: vec![1],
                headers: vec![],
            },
            lease_until_us: 0,
            not_before_us: 0,
        };
        creates.send(PendingCreate { write, done }).await.unwrap();
        wait_until(|| queued() == 0, "the committing task takes the first order").await;
        let calls: Vec<_> = orders
            .iter()
            .cloned()
            .map(|o| {
                let store = Arc::clone(store);
                tokio::spawn(async move { create(&store, &o).await })
            })
            .collect();
        wait_until(|| queued() == orders.len(), "the orders queue up as one group").await;
        drop(turn);
        assert!(matches!(first_outcome.await.unwrap(), Ok(Created::New(_))));
        let mut outcomes = Vec::new();
        for call in calls {
            outcomes.push(call.await.unwrap());
        }
        outcomes
    }

    /// One group, written in one statement per table: each order gets its
    /// own outbox row, a key taken in the store or earlier in the same group
    /// is answered as taken and writes nothing.
    #[tokio::test]
    async fn a_group_is_written_together_and_each_order_gets_its_own_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(&dir).await;
        assert!(matches!(create(&store, &order("old", "k0")).await, Ok(Created::New(_))));
        let mut two_items = order("a", "k1");
        two_items.items.push(LineItem {
            sku: "t".into(),
            quantity: 3,
            unit_price_minor: 7,
        });
        let orders = [
            two_items.clone(),
            order("b", "k0"),
            order("c", ""),
            order("d", "k2"),
            order("e", "k2"),
        ];
        let outcomes = create_as_one_group(&store, &orders).await;
        let id = |i: usize| match outcomes[i] {
            Ok(Created::New(id)) => id,
            ref other => panic!("order {i}: {other:?}"),
        };
        let (a, c, d) = (id(0), id(2), id(3));
        assert!(matches!(outcomes[1], Ok(Created::KeyTaken)), "{outcomes:?}");
        assert!(matches!(outcomes[4], Ok(Created::KeyTaken)), "{outcomes:?}");
        assert_eq!(store.get("a").await.unwrap().unwrap().items, two_items.items);
        for absent in ["b", "e"] {
            assert!(store.get(absent).await.unwrap().is_none(), "{absent}");
        }
        let claimed = store.claim(now_us(), now_us() + 1_000_000, 100).await.unwrap();
        let key_of = |id: i64| claimed.iter().find(|c| c.id == id).map(|c| c.record.key.clone());
        assert_eq!(
            [key_of(a), key_of(c), key_of(d)],
            [Some("a".into()), Some("c".into()), Some("d".into())]
        );
        assert_eq!(
            store.find_key("u", "k2", 0).await.unwrap().unwrap().order_id,
            "d",
            "the first order of the group keeps the key"
        );
    }

    /// A group whose write fails is written again one order at a time: the
    /// failing order (here its id is taken) fails alone, a taken key is
    /// still answered as taken, and every other order of the group commits.
    #[tokio::test]
    async fn a_failing_order_fails_alone_in_its_group() {
        let dir = tempfile::tempdir().unwrap();
        let store = sqlite_store(&dir).await;
        assert!(matches!(
            create(&store, &order("taken", "k0")).await,
            Ok(Created::New(_))
        ));
        let orders = [order("a", "k1"), order("taken", "k2"), order("b", "k0"), order("c", "")];
        let outcomes = create_as_one_group(&store, &orders).await;
        assert!(matches!(outcomes[0], Ok(Created::New(_))), "{outcomes:?}");
        assert!(matches!(outcomes[1], Err(Error::Store(_))), "{outcomes:?}");
        assert!(matches!(outcomes[2], Ok(Created::KeyTaken)), "{outcomes:?}");
        assert!(matches!(outcomes[3], Ok(Created::New(_))), "{outcomes:?}");
        for id in ["a", "c", "taken"] {
            assert!(store.get(id).await.unwrap().is_some(), "{id} is stored");
        }
        assert!(store.get("b").await.unwrap().is_none());
        assert_eq!(
            store.get("taken").await.unwrap().unwrap().request_id,
            "k0",
            "the first order keeps its id"
        );
    }

    #[test]
    fn timestamps_keep_microseconds() {
        for us in [0, 1, 1_700_000_000_123_456, -1] {
            assert_eq!(us_from_timestamp(&timestamp_from_us(us)), us);
        }
    }
}
