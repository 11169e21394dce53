//! Test support shared by the services' black-box tests: a real Tansu broker
//! per test ([`Broker`]), topics, unique names, polling with a deadline
//! ([`eventually`]), reading and writing raw records, and the real binaries as
//! child processes ([`Service`]). Nothing here mocks Kafka.

use std::{
    io::{BufRead, BufReader},
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use rdkafka::{
    ClientConfig, Message,
    admin::{AdminClient, AdminOptions, NewTopic, TopicReplication},
    client::DefaultClientContext,
    consumer::{BaseConsumer, Consumer},
    message::{Header, OwnedHeaders, OwnedMessage},
    producer::{FutureProducer, FutureRecord},
};

/// Settings every client needs against Tansu (see the README): a fast group
/// join and no long sleep inside fetch.
pub const TANSU_CLIENT_OPTIONS: &str = "session.timeout.ms=6000,heartbeat.interval.ms=1000,fetch.wait.max.ms=10";

/// The value of the sample `series` (name and labels exactly as exposed, e.g.
/// `orders_created_total` or `x_total{reason="y"}`) in a Prometheus text scrape.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let value = line.strip_prefix(series)?.strip_prefix(' ')?;
        value.split_whitespace().next()?.parse().ok()
    })
}

/// The two order lines the tests use: 2 x SKU-1 at 19.99 and 1 x SKU-2 at
/// 5.00 (total 4498 minor units).
pub fn sample_items() -> Vec<orders_contract::v1::LineItem> {
    use orders_contract::v1::LineItem;
    vec![
        LineItem {
            sku: "SKU-1".into(),
            quantity: 2,
            unit_price_minor: 1999,
        },
        LineItem {
            sku: "SKU-2".into(),
            quantity: 1,
            unit_price_minor: 500,
        },
    ]
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed),
        nanos % 1_000_000_000
    )
}

/// A TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`
/// naming `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Where the `tansu` binary is: `$TANSU_BIN`, `tansu` on `PATH`, or
/// `~/.cargo/bin/tansu` (where `scripts/install-tools.sh` puts it).
pub fn tansu_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("TANSU_BIN") {
        return Ok(PathBuf::from(p));
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("tansu");
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
    let candidate = home.join(".cargo/bin/tansu");
    if candidate.is_file() {
        return Ok(candidate);
    }
    bail!("tansu not found: run scripts/install-tools.sh (or set TANSU_BIN)")
}

/// A Tansu broker with sqlite storage in a temporary folder, on its own port.
/// It can be stopped, killed and restarted on the same port with its data.
#[derive(Debug)]
pub struct Broker {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
    authentication: bool,
}

impl Broker {
    /// Starts a broker and waits until it answers metadata requests.
    pub async fn start() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("tansu-").tempdir()?;
        let mut broker = Broker {
            port: free_port(),
            dir,
            child: None,
            authentication: false,
        };
        broker.spawn().await?;
        Ok(broker)
    }

    /// Starts a broker that requires SASL/SCRAM-SHA-512 as `user` with
    /// `password`, with `topics` (name, partitions) created. (Users and topics
    /// are set up before authentication is switched on: Tansu's own CLI does
    /// not authenticate.)
    pub async fn start_with_sasl(user: &str, password: &str, topics: &[(&str, i32)]) -> anyhow::Result<Self> {
        let mut broker = Broker::start().await?;
        let url = format!("tcp://{}", broker.addr());
        let created = Command::new(tansu_bin()?)
            .args(["user", "create", user, password, "--broker", &url])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()?;
        if !created.success() {
            bail!("tansu user create failed: {created}");
        }
        for (topic, partitions) in topics {
            broker.create_topic(topic, *partitions).await?;
        }
        broker.stop();
        broker.authentication = true;
        broker.spawn_process()?;
        // Metadata without credentials is refused now: wait for the port only.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", broker.port)).is_err() {
            if Instant::now() > deadline {
                bail!("secured tansu did not open its port");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(broker)
    }

    /// `127.0.0.1:port`, for `KAFKA_BROKERS`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's data folder (its log is `tansu.log` there).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn_process(&mut self) -> anyhow::Result<()> {
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("tansu.log"))?;
        let child = Command::new(tansu_bin()?)
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "sqlite://tansu.db"])
            .args(self.authentication.then_some("--authentication"))
            // Tansu resolves the sqlite path against its working directory.
            .current_dir(self.dir.path())
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("CLUSTER_ID")
            .env_remove("LISTENER_URL")
            .env_remove("ADVERTISED_LISTENER_URL")
            .env_remove("STORAGE_ENGINE")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start tansu")?;
        self.child = Some(child);
        Ok(())
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        self.spawn_process()?;
        let addr = self.addr();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
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
                    "tansu on {addr} did not answer within 30 s: {probe:?} (log in {:?})",
                    self.dir.path()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Stops the broker: SIGTERM, then SIGKILL if it lingers (Tansu may keep
    /// serving connected clients for a while after SIGTERM).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = Instant::now() + Duration::from_secs(2);
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

    /// Starts the broker again on the same port with the same data.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop();
        self.spawn().await
    }

    /// Creates `name` with `partitions` partitions.
    pub async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        let admin: AdminClient<DefaultClientContext> =
            ClientConfig::new().set("bootstrap.servers", self.addr()).create()?;
        let results = admin
            .create_topics(
                &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
                &AdminOptions::new(),
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
        let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", self.addr()).create()?;
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
        let (addr, topic) = (self.addr(), topic.to_owned());
        tokio::task::spawn_blocking(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &addr)
                .set("group.id", unique("reader"))
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

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The value of header `name` of `message`, as text.
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

/// Path of a workspace binary built next to the running test
/// (`target/<profile>/<name>`).
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first",
        path.display()
    );
    path
}

/// A real service binary running as a child process, its output captured
/// line by line.
#[derive(Debug)]
pub struct Service {
    name: String,
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Service {
    /// Starts workspace binary `name` with `env` on top of a clean set of
    /// variables (PATH and HOME kept).
    pub fn spawn(name: &str, env: &[(&str, String)]) -> anyhow::Result<Self> {
        let mut command = Command::new(bin_path(name));
        command.env_clear();
        for keep in ["PATH", "HOME"] {
            if let Some(v) = std::env::var_os(keep) {
                command.env(keep, v);
            }
        }
        command.env("RUST_LOG", "info").env("NO_COLOR", "1");
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let lines = Arc::new(Mutex::new(Vec::new()));
        let echo = std::env::var_os("TEST_LOG").is_some();
        for stream in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let (lines, prefix) = (lines.clone(), name.to_owned());
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if echo {
                        eprintln!("[{prefix}] {line}");
                    }
                    lines.lock().unwrap_or_else(|e| e.into_inner()).push(line);
                }
            });
        }
        Ok(Self {
            name: name.to_owned(),
            child,
            lines,
        })
    }

    /// Everything printed so far.
    pub fn output(&self) -> Vec<String> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Lines printed so far that contain every one of `needles`.
    pub fn lines_with(&self, needles: &[&str]) -> Vec<String> {
        self.output()
            .into_iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .collect()
    }

    /// Waits until a line containing every one of `needles` is printed.
    pub async fn wait_for_line(&self, needles: &[&str], timeout: Duration) -> String {
        let what = format!("{} to print a line with {needles:?}", self.name);
        let found = tokio::time::timeout(timeout, async {
            loop {
                if let Some(line) = self.lines_with(needles).into_iter().next() {
                    return line;
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
        })
        .await;
        match found {
            Ok(line) => line,
            Err(_) => panic!(
                "timed out after {timeout:?} waiting for {what}; output:\n{}",
                self.output().join("\n")
            ),
        }
    }

    /// Sends SIGTERM (or `signal`, e.g. "INT", "KILL").
    pub fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status();
    }

    /// Waits for the process to exit, at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not exit within {timeout:?}; output:\n{}",
                    self.name,
                    self.output().join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// SIGKILL, and wait for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}
