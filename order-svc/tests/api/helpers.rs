//! `spawn_app()`: a broker, a unique topic, order-svc bound to port 0, and a
//! client for it.

use std::{net::SocketAddr, time::Duration};

use order_svc::{config::Config, error::Error, startup::Application};
use orders_contract::v1::{CreateOrderRequest, order_service_client::OrderServiceClient};
use service_kit::secret::Secret;
use testkit::{Broker, unique};
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;

#[derive(Debug)]
pub(crate) struct TestApp {
    pub(crate) broker: Broker,
    pub(crate) topic: String,
    pub(crate) grpc_addr: SocketAddr,
    pub(crate) ops_addr: SocketAddr,
    /// The store it uses (a fresh SQLite file unless the test chose one).
    pub(crate) database_url: Secret,
    shutdown: Option<oneshot::Sender<()>>,
    handle: Option<JoinHandle<Result<(), Error>>>,
}

pub(crate) async fn spawn_app() -> TestApp {
    spawn_app_with(|_| {}).await
}

/// Like [`spawn_app`], with the configuration adjusted by `customize`, on the
/// broker the tests share.
pub(crate) async fn spawn_app_with(customize: impl FnOnce(&mut Config)) -> TestApp {
    let broker = Broker::shared().await.expect("broker starts");
    spawn_app_on_new_topic(broker, customize).await
}

/// Like [`spawn_app_with`], on a broker of its own that the test may stop.
pub(crate) async fn spawn_app_alone_with(customize: impl FnOnce(&mut Config)) -> TestApp {
    let broker = Broker::start().await.expect("broker starts");
    spawn_app_on_new_topic(broker, customize).await
}

async fn spawn_app_on_new_topic(broker: Broker, customize: impl FnOnce(&mut Config)) -> TestApp {
    let topic = unique("orders");
    broker.create_topic(&topic, 3).await.expect("topic created");
    spawn_app_on(broker, topic, customize).await.expect("order-svc builds")
}

/// order-svc against `broker`'s existing `topic`; Err if it does not build.
pub(crate) async fn spawn_app_on(
    broker: Broker,
    topic: String,
    customize: impl FnOnce(&mut Config),
) -> Result<TestApp, Error> {
    service_kit::telemetry::init_for_tests("order-svc-tests");
    let mut config = Config::for_tests(&broker.addr(), &topic);
    config.kafka.options = broker.client_options().parse().unwrap();
    config.publish_timeout = Duration::from_secs(3);
    if let Some(url) = test_database_url().await {
        config.database_url = url;
    }
    customize(&mut config);
    let database_url = config.database_url.clone();
    let app = Application::build(config).await?;
    Ok(run(app, broker, topic, database_url))
}

/// With `TEST_DATABASE=postgres`, a fresh database on the PostgreSQL the
/// tests share; otherwise None (each app gets a fresh SQLite file).
pub(crate) async fn test_database_url() -> Option<Secret> {
    match std::env::var("TEST_DATABASE").as_deref() {
        Ok("postgres") => Some(
            testkit::Postgres::shared()
                .await
                .expect("PostgreSQL starts")
                .create_database("orders")
                .await
                .expect("a database")
                .parse()
                .unwrap(),
        ),
        Ok("sqlite") | Err(_) => None,
        Ok(other) => panic!("TEST_DATABASE={other}: use sqlite or postgres"),
    }
}

/// A fresh SQLite file's URL, for tests of SQLite itself.
pub(crate) fn sqlite_url() -> Secret {
    let file = std::env::temp_dir().join(format!("order-svc-test-{}.db", uuid::Uuid::now_v7()));
    format!("sqlite://{}", file.display()).parse().unwrap()
}

/// Runs a built `app` until the test stops it.
pub(crate) fn run(app: Application, broker: Broker, topic: String, database_url: Secret) -> TestApp {
    let (grpc_addr, ops_addr) = (app.grpc_addr(), app.ops_addr());
    let (tx, rx) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run_until_stopped(async move {
        let _ = rx.await;
    }));
    TestApp {
        broker,
        topic,
        grpc_addr,
        ops_addr,
        database_url,
        shutdown: Some(tx),
        handle: Some(handle),
    }
}

impl TestApp {
    pub(crate) async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.grpc_addr))
            .unwrap()
            .connect()
            .await
            .expect("client connects")
    }

    pub(crate) async fn client(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::new(self.channel().await)
    }

    pub(crate) async fn get(&self, path: &str) -> (u16, String) {
        let response = reqwest::get(format!("http://{}{path}", self.ops_addr))
            .await
            .expect("ops server answers");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    }

    pub(crate) async fn metrics(&self) -> String {
        self.get("/metrics").await.1
    }

    /// Shuts the app down as a signal would, and returns how it ended.
    pub(crate) async fn stop(&mut self) -> Result<(), Error> {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        match self.handle.take() {
            Some(handle) => tokio::time::timeout(Duration::from_secs(20), handle)
                .await
                .expect("order-svc stops within 20 s")
                .expect("order-svc task did not panic"),
            None => Ok(()),
        }
    }
}

impl Drop for TestApp {
    /// Removes the test's SQLite file (and its WAL files) from the temporary
    /// directory: Config::for_tests and sqlite_url make one per app.
    fn drop(&mut self) {
        let url = self.database_url.expose();
        if let Some(path) = url.strip_prefix("sqlite://")
            && std::path::Path::new(path).starts_with(std::env::temp_dir())
            && path.contains("order-svc-test-")
        {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{path}{suffix}"));
            }
        }
    }
}

pub(crate) fn valid_request(user: &str) -> CreateOrderRequest {
    CreateOrderRequest {
        user_id: user.into(),
        currency: "EUR".into(),
        items: testkit::sample_items(),
        request_id: String::new(),
    }
}

pub(crate) use testkit::metric;

/// Calls CreateOrder and returns the order; panics on an error status.
pub(crate) async fn create(
    client: &mut OrderServiceClient<Channel>,
    request: orders_contract::v1::CreateOrderRequest,
) -> orders_contract::v1::Order {
    client
        .create_order(request)
        .await
        .expect("CreateOrder succeeds")
        .into_inner()
        .order
        .expect("an order")
}

/// Takes SQLite's write lock on `app`'s store from another connection and
/// holds it until the returned connection is dropped (the transaction rolls
/// back): every write of order-svc then waits, and fails after the busy
/// timeout, as when the store cannot take writes.
pub(crate) async fn hold_sqlite_write_lock(app: &TestApp) -> sqlx::SqliteConnection {
    use sqlx::Connection as _;
    let mut conn = sqlx::SqliteConnection::connect(app.database_url.expose())
        .await
        .expect("the store's file opens");
    sqlx::query("BEGIN EXCLUSIVE")
        .execute(&mut conn)
        .await
        .expect("write lock taken");
    conn
}
