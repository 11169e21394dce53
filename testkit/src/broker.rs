//! Real brokers for the black-box tests: Apache Kafka by default, Tansu when
//! `TEST_BROKER=tansu`. A [`Broker`] is a handle: [`Broker::start`] gives a
//! test its own node, which it may stop, kill and restart; [`Broker::shared`]
//! gives every test of a test binary the same node, for tests that isolate
//! themselves with unique topics and groups and never break the broker (a
//! JVM takes seconds to start on 2 cores).

mod kafka;
mod tansu;

use std::{
    path::{Path, PathBuf},
    process::{Child, Command},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use rdkafka::{
    ClientConfig, Message,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    message::{Header, OwnedHeaders, OwnedMessage},
    producer::{FutureProducer, FutureRecord},
};

use kafka::KafkaNode;
pub use kafka::kafka_libs;
pub use tansu::tansu_bin;

use crate::free_port;

const TANSU_OPTIONS: &str = include_str!("../../scripts/tansu-kafka-options");

/// Which broker the tests run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// Apache Kafka (KRaft), the broker users run.
    Kafka,
    /// Tansu, the broker of `scripts/run.sh`.
    Tansu,
}

impl BrokerKind {
    /// `TEST_BROKER` (`kafka`, the default, or `tansu`).
    pub fn from_env() -> Self {
        match std::env::var("TEST_BROKER").as_deref() {
            Ok("tansu") => BrokerKind::Tansu,
            Ok("kafka") | Ok("") | Err(_) => BrokerKind::Kafka,
            Ok(other) => panic!("TEST_BROKER={other:?}: expected kafka or tansu"),
        }
    }

    /// librdkafka settings the services get in tests on this broker, as
    /// `KAFKA_OPTIONS`. On Apache Kafka: a 6 s session, so a killed member's
    /// partitions move within seconds. On Tansu: what
    /// `scripts/tansu-kafka-options` says it needs.
    pub fn client_options(self) -> &'static str {
        match self {
            BrokerKind::Kafka => "session.timeout.ms=6000,heartbeat.interval.ms=1000",
            BrokerKind::Tansu => TANSU_OPTIONS
                .lines()
                .find(|l| !l.starts_with('#') && !l.trim().is_empty())
                .expect("scripts/tansu-kafka-options has its options line"),
        }
    }
}

/// How clients must connect: SASL/SCRAM-SHA-512 and/or TLS on the clients'
/// listener. The broker's own admin listener stays plaintext on loopback.
#[derive(Debug, Default, Clone)]
pub struct Security {
    sasl: Option<(String, String)>,
    tls: Option<Tls>,
}

/// A CA and a server certificate for `127.0.0.1` / `localhost`, as PEM files.
#[derive(Debug, Clone)]
struct Tls {
    /// The server's private key and certificate, for Kafka's PEM keystore.
    keystore: PathBuf,
    /// The CA certificate clients trust (`KAFKA_SSL_CA_LOCATION`).
    ca: PathBuf,
}

impl Security {
    fn is_secured(&self) -> bool {
        self.sasl.is_some() || self.tls.is_some()
    }

    /// The clients' `security.protocol` (Kafka's listener protocol name).
    fn protocol(&self) -> &'static str {
        match (self.sasl.is_some(), self.tls.is_some()) {
            (true, true) => "SASL_SSL",
            (true, false) => "SASL_PLAINTEXT",
            (false, true) => "SSL",
            (false, false) => "PLAINTEXT",
        }
    }
}

impl Tls {
    fn create(dir: &Path) -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "orders testkit CA");
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
        let key = KeyPair::generate()?;
        let cert =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?.signed_by(&key, &ca)?;
        let tls = Tls {
            keystore: dir.join("broker-keystore.pem"),
            ca: dir.join("ca.pem"),
        };
        std::fs::write(&tls.keystore, format!("{}{}", key.serialize_pem(), cert.pem()))?;
        std::fs::write(&tls.ca, ca.pem())?;
        Ok(tls)
    }
}

#[derive(Debug)]
enum Node {
    Kafka(KafkaNode),
    Tansu { port: u16 },
}

#[derive(Debug)]
struct Inner {
    kind: BrokerKind,
    node: Node,
    security: Security,
    child: Mutex<Option<Child>>,
    // Dropped last: the process is killed (Drop for Inner) before its
    // folder goes.
    dir: tempfile::TempDir,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running broker (see the module docs).
#[derive(Debug, Clone)]
pub struct Broker {
    inner: Arc<Inner>,
    shared: bool,
}

static SHARED: tokio::sync::OnceCell<Broker> = tokio::sync::OnceCell::const_new();

impl Broker {
    /// A broker of its own for this test, of the kind `TEST_BROKER` names.
    pub async fn start() -> anyhow::Result<Self> {
        Self::start_kind(BrokerKind::from_env()).await
    }

    /// A broker of its own, of `kind`.
    pub async fn start_kind(kind: BrokerKind) -> anyhow::Result<Self> {
        Self::launch(kind, Security::default()).await
    }

    /// The broker every test of this test binary shares. It cannot be
    /// stopped or restarted; use unique topics and groups on it.
    pub async fn shared() -> anyhow::Result<Self> {
        let broker = SHARED.get_or_try_init(Self::start).await?;
        Ok(Broker {
            inner: broker.inner.clone(),
            shared: true,
        })
    }

    /// A broker of its own whose clients' listener requires
    /// SASL/SCRAM-SHA-512 as `user` with `password`, with `topics` (name,
    /// partitions) created.
    pub async fn start_with_sasl(user: &str, password: &str, topics: &[(&str, i32)]) -> anyhow::Result<Self> {
        let security = Security {
            sasl: Some((user.to_owned(), password.to_owned())),
            tls: None,
        };
        Self::start_secured(BrokerKind::from_env(), security, topics).await
    }

    /// An Apache Kafka broker whose clients' listener is SASL_SSL: TLS with a
    /// certificate from a fresh CA ([`Broker::ca_location`]) and
    /// SCRAM-SHA-512 as `user` with `password`, with `topics` created.
    pub async fn start_with_tls_and_sasl(user: &str, password: &str, topics: &[(&str, i32)]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("broker-tls-").tempdir()?;
        crate::remove_after_exit(dir.path());
        let security = Security {
            sasl: Some((user.to_owned(), password.to_owned())),
            tls: Some(Tls::create(dir.path())?),
        };
        let broker = Self::start_secured(BrokerKind::Kafka, security, topics).await?;
        // The certificates live as long as the broker.
        std::mem::forget(dir);
        Ok(broker)
    }

    async fn start_secured(kind: BrokerKind, security: Security, topics: &[(&str, i32)]) -> anyhow::Result<Self> {
        match kind {
            BrokerKind::Kafka => {
                let broker = Self::launch(kind, security).await?;
                for (topic, partitions) in topics {
                    broker.create_topic(topic, *partitions).await?;
                }
                Ok(broker)
            }
            BrokerKind::Tansu => {
                // Tansu's CLI does not authenticate: users and topics are set
                // up before authentication is switched on.
                let (user, password) = security.sasl.clone().context("Tansu supports SASL only")?;
                if security.tls.is_some() {
                    bail!("the Tansu broker of the tests has no TLS listener");
                }
                let mut broker = Self::launch(kind, Security::default()).await?;
                let port = broker.port();
                tansu::create_user(port, &user, &password)?;
                for (topic, partitions) in topics {
                    broker.create_topic(topic, *partitions).await?;
                }
                broker.stop();
                let mut inner = Arc::into_inner(broker.inner).context("a fresh broker has one handle")?;
                inner.security = security;
                let broker = Broker {
                    inner: Arc::new(inner),
                    shared: false,
                };
                broker.spawn_process()?;
                // Metadata without credentials is refused now: wait for the port only.
                let deadline = Instant::now() + Duration::from_secs(30);
                while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                    if Instant::now() > deadline {
                        bail!("secured tansu did not open its port");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(broker)
            }
        }
    }

    async fn launch(kind: BrokerKind, security: Security) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{kind:?}-").to_lowercase())
            .tempdir()?;
        // The broker's process goes with the test process (its watchdog);
        // its data goes a moment later.
        crate::remove_after_exit(dir.path());
        let node = match kind {
            BrokerKind::Kafka => {
                let (path, settings) = (dir.path().to_owned(), security.clone());
                Node::Kafka(tokio::task::spawn_blocking(move || KafkaNode::create(&path, &settings)).await??)
            }
            BrokerKind::Tansu => Node::Tansu { port: free_port() },
        };
        let broker = Broker {
            inner: Arc::new(Inner {
                kind,
                node,
                security,
                child: Mutex::new(None),
                dir,
            }),
            shared: false,
        };
        broker.spawn_and_wait().await?;
        Ok(broker)
    }

    /// Which broker this is.
    pub fn kind(&self) -> BrokerKind {
        self.inner.kind
    }

    /// The librdkafka settings tests give the services on this broker.
    pub fn client_options(&self) -> &'static str {
        self.inner.kind.client_options()
    }

    /// `127.0.0.1:port` of the clients' listener, for `KAFKA_BROKERS`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port())
    }

    fn port(&self) -> u16 {
        match &self.inner.node {
            Node::Kafka(node) => node.external_port.unwrap_or(node.internal_port),
            Node::Tansu { port } => *port,
        }
    }

    /// The listener the tests' own admin, producer and reader use: plaintext
    /// on Apache Kafka even when clients must authenticate.
    fn admin_addr(&self) -> String {
        match &self.inner.node {
            Node::Kafka(node) => format!("127.0.0.1:{}", node.internal_port),
            Node::Tansu { port } => format!("127.0.0.1:{port}"),
        }
    }

    /// The CA file clients trust, when the clients' listener is TLS.
    pub fn ca_location(&self) -> Option<&Path> {
        self.inner.security.tls.as_ref().map(|t| t.ca.as_path())
    }

    /// The broker's data folder.
    pub fn dir(&self) -> &Path {
        self.inner.dir.path()
    }

    /// The broker's log file.
    pub fn log_path(&self) -> PathBuf {
        match &self.inner.node {
            Node::Kafka(node) => node.log_path(),
            Node::Tansu { .. } => tansu::log_path(self.dir()),
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn spawn_process(&self) -> anyhow::Result<()> {
        let child = match &self.inner.node {
            Node::Kafka(node) => node.spawn()?,
            Node::Tansu { port } => tansu::spawn(self.dir(), *port, self.inner.security.sasl.is_some())?,
        };
        *self.child() = Some(child);
        Ok(())
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.inner.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the process and waits until it answers a metadata request; a
    /// process that exits first, or a deadline, fails with its log's tail.
    async fn spawn_and_wait(&self) -> anyhow::Result<()> {
        self.spawn_process()?;
        let addr = self.admin_addr();
        let limit = match self.inner.kind {
            BrokerKind::Kafka => Duration::from_secs(90),
            BrokerKind::Tansu => Duration::from_secs(30),
        };
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child().as_mut().map(Child::try_wait).transpose()?.flatten() {
                bail!(
                    "{:?} broker exited ({status}) before it answered on {addr}; log {}:\n{}",
                    self.inner.kind,
                    self.log_path().display(),
                    self.log_tail()
                );
            }
            let probe = {
                let addr = addr.clone();
                tokio::task::spawn_blocking(move || {
                    let client: BaseConsumer = ClientConfig::new().set("bootstrap.servers", &addr).create()?;
                    client.fetch_metadata(None, Duration::from_secs(2)).map(|_| ())
                })
                .await?
            };
            if probe.is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{:?} broker on {addr} did not answer within {limit:?}: {probe:?}; log {}:\n{}",
                    self.inner.kind,
                    self.log_path().display(),
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn assert_own(&self, what: &str) {
        assert!(
            !self.shared,
            "cannot {what} the shared broker: the test needs its own (Broker::start)"
        );
    }

    /// Stops the broker: SIGTERM, then SIGKILL if it has not exited within
    /// 15 s (Tansu may keep serving connected clients after SIGTERM).
    pub fn stop(&mut self) {
        self.assert_own("stop");
        if let Some(mut child) = self.child().take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let grace = match self.inner.kind {
                BrokerKind::Kafka => Duration::from_secs(15),
                BrokerKind::Tansu => Duration::from_secs(2),
            };
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `kill -9`: the broker gets no chance to flush or close anything.
    pub fn kill(&mut self) {
        self.assert_own("kill");
        if let Some(mut child) = self.child().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the broker again (stopping it first if it runs) on the same
    /// ports with the same data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn_and_wait().await
    }

    fn admin_client<C: rdkafka::config::FromClientConfig>(&self) -> anyhow::Result<C> {
        Ok(ClientConfig::new()
            .set("bootstrap.servers", self.admin_addr())
            .create()?)
    }

    /// Creates `name` with `partitions` partitions.
    pub async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        self.create_topic_with(name, partitions, &[]).await
    }

    /// Creates `name` with `partitions` partitions and topic `configs` (for
    /// example `max.message.bytes`).
    pub async fn create_topic_with(&self, name: &str, partitions: i32, configs: &[(&str, &str)]) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> = self.admin_client()?;
        let topic = configs.iter().fold(
            NewTopic::new(name, partitions, TopicReplication::Fixed(1)),
            |t, (k, v)| t.set(k, v),
        );
        let results = admin
            .create_topics(
                &[topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            )
            .await?;
        for result in results {
            if let Err((topic, code)) = result {
                bail!("cannot create topic {topic}: {code}");
            }
        }
        Ok(())
    }

    /// Creates `topic` (`partitions` partitions) and `topic.dlq` (1).
    pub async fn create_topics(&self, topic: &str, partitions: i32) -> anyhow::Result<()> {
        self.create_topic(topic, partitions).await?;
        self.create_topic(&format!("{topic}.dlq"), 1).await
    }

    /// Publishes a raw record, for poison-pill and compatibility tests.
    pub async fn produce(
        &self,
        topic: &str,
        key: &[u8],
        value: &[u8],
        headers: &[(&str, &[u8])],
    ) -> anyhow::Result<()> {
        let producer: FutureProducer = self.admin_client()?;
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        producer
            .send(
                FutureRecord::to(topic).key(key).payload(value).headers(h),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(e, _)| e)?;
        Ok(())
    }

    /// Reads every record of `topic` from the start until `want` have been
    /// read or `timeout` passes (no consumer group involved).
    pub async fn read_all(&self, topic: &str, want: usize, timeout: Duration) -> anyhow::Result<Vec<OwnedMessage>> {
        let (addr, topic) = (self.admin_addr(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &addr)
                .set("group.id", crate::unique("reader"))
                .set("enable.auto.commit", "false")
                .set("fetch.wait.max.ms", "10")
                .create()?;
            let metadata = consumer.fetch_metadata(Some(&topic), Duration::from_secs(5))?;
            let partitions = metadata.topics().first().map(|t| t.partitions().len()).unwrap_or(0);
            let mut tpl = rdkafka::TopicPartitionList::new();
            for p in 0..partitions {
                tpl.add_partition_offset(&topic, p as i32, rdkafka::Offset::Beginning)?;
            }
            consumer.assign(&tpl)?;
            let deadline = Instant::now() + timeout;
            let mut out = Vec::new();
            while out.len() < want && Instant::now() < deadline {
                if let Some(message) = consumer.poll(Duration::from_millis(100)) {
                    out.push(message?.detach());
                }
            }
            Ok(out)
        })
        .await?
    }
}

/// The value of header `name` of `message`, as text (the last one of that
/// name).
pub fn header(message: &OwnedMessage, name: &str) -> Option<String> {
    use rdkafka::message::Headers;
    message
        .headers()?
        .iter()
        .filter(|h| h.key == name)
        .last()
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}
