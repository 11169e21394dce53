//! An Apache Kafka broker from the jars `scripts/install-tools.sh --kafka`
//! copies from Maven Central: one combined broker + controller (KRaft) on
//! loopback ports, in a temporary folder.

use std::{
    fmt::Write as _,
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, bail};

use super::Security;
use crate::{free_port, workspace_root};

/// Every node has its own storage folder, so one fixed id (16 bytes,
/// base64url, as `kafka-storage.sh random-uuid` prints) serves them all.
const CLUSTER_ID: &str = "b3JkZXJzLXRlc3RraXQtMQ";

/// The ports and files of one node; stable across restarts so clients
/// reconnect to the same addresses and the data survives.
#[derive(Debug)]
pub(super) struct KafkaNode {
    /// PLAINTEXT listener: inter-broker traffic and the tests' own admin.
    pub(super) internal_port: u16,
    /// The clients' listener when the node is secured (`None`: clients use
    /// the internal one).
    pub(super) external_port: Option<u16>,
    controller_port: u16,
    dir: PathBuf,
}

/// The directory holding the broker's jars: `$KAFKA_LIBS`, or
/// `.tools/kafka-<version>/libs` with the version `scripts/kafka/pom.xml` pins.
pub fn kafka_libs() -> anyhow::Result<PathBuf> {
    let libs = match std::env::var_os("KAFKA_LIBS") {
        Some(dir) => PathBuf::from(dir),
        None => {
            let pom = workspace_root().join("scripts/kafka/pom.xml");
            let text = std::fs::read_to_string(&pom).with_context(|| format!("cannot read {}", pom.display()))?;
            let version = text
                .split_once("<kafka.version>")
                .and_then(|(_, rest)| rest.split_once("</kafka.version>"))
                .map(|(v, _)| v.trim().to_owned())
                .with_context(|| format!("no <kafka.version> in {}", pom.display()))?;
            workspace_root().join(format!(".tools/kafka-{version}/libs"))
        }
    };
    let has_broker = std::fs::read_dir(&libs)
        .map(|entries| {
            entries.flatten().any(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                name.starts_with("kafka_2.13-") && name.ends_with(".jar")
            })
        })
        .unwrap_or(false);
    if !has_broker {
        bail!(
            "Apache Kafka's jars are not in {}: run scripts/install-tools.sh --kafka (or set KAFKA_LIBS)",
            libs.display()
        );
    }
    Ok(libs)
}

/// `$JAVA_HOME/bin/java` or `java` on PATH, checked to be Java 17 or newer.
fn java() -> anyhow::Result<PathBuf> {
    let java = std::env::var_os("JAVA_HOME")
        .map(|home| PathBuf::from(home).join("bin/java"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("java"));
    let out = Command::new(&java)
        .args(["-XshowSettings:properties", "-version"])
        .output()
        .with_context(|| format!("cannot run {} (Apache Kafka needs Java 17 or newer)", java.display()))?;
    let text = String::from_utf8_lossy(&out.stderr);
    let major = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("java.specification.version = "))
        .and_then(|v| v.split('.').next()?.parse::<u32>().ok());
    match major {
        Some(m) if m >= 17 => Ok(java),
        found => bail!(
            "{} is Java {found:?}: Apache Kafka needs Java 17 or newer",
            java.display()
        ),
    }
}

impl KafkaNode {
    /// Lays out and formats a new node's storage (the SCRAM users, if any,
    /// are written into the metadata log at format time, as KRaft requires).
    pub(super) fn create(dir: &Path, security: &Security) -> anyhow::Result<Self> {
        let node = KafkaNode {
            internal_port: free_port(),
            external_port: security.is_secured().then(free_port),
            controller_port: free_port(),
            dir: dir.to_owned(),
        };
        std::fs::write(node.properties_path(), node.properties(security)?)?;
        let mut format = Command::new(java()?);
        format
            .args(["-Xms64m", "-Xmx256m", "-cp"])
            .arg(classpath()?)
            .args([
                "kafka.tools.StorageTool",
                "format",
                "--standalone",
                "--ignore-formatted",
            ])
            .args(["-t", CLUSTER_ID, "-c"])
            .arg(node.properties_path());
        if let Some((user, password)) = &security.sasl {
            format
                .arg("--add-scram")
                .arg(format!("SCRAM-SHA-512=[name={user},password={password}]"));
        }
        let out = format.output().context("cannot run Kafka's StorageTool")?;
        if !out.status.success() {
            bail!(
                "formatting Kafka's storage failed ({}):\n{}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(node)
    }

    fn properties_path(&self) -> PathBuf {
        self.dir.join("server.properties")
    }

    pub(super) fn log_path(&self) -> PathBuf {
        self.dir.join("broker.log")
    }

    fn properties(&self, security: &Security) -> anyhow::Result<String> {
        let (internal, controller) = (self.internal_port, self.controller_port);
        let mut p = String::new();
        writeln!(p, "process.roles=broker,controller")?;
        writeln!(p, "node.id=1")?;
        writeln!(p, "controller.quorum.bootstrap.servers=127.0.0.1:{controller}")?;
        writeln!(p, "controller.listener.names=CONTROLLER")?;
        writeln!(p, "inter.broker.listener.name=PLAINTEXT")?;
        let mut listeners = format!("PLAINTEXT://127.0.0.1:{internal},CONTROLLER://127.0.0.1:{controller}");
        let mut advertised = format!("PLAINTEXT://127.0.0.1:{internal}");
        let mut map = "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT".to_owned();
        if let Some(external) = self.external_port {
            let protocol = security.protocol();
            write!(listeners, ",EXTERNAL://127.0.0.1:{external}")?;
            write!(advertised, ",EXTERNAL://127.0.0.1:{external}")?;
            write!(map, ",EXTERNAL:{protocol}")?;
            if security.sasl.is_some() {
                writeln!(p, "listener.name.external.sasl.enabled.mechanisms=SCRAM-SHA-512")?;
                writeln!(
                    p,
                    "listener.name.external.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;"
                )?;
            }
            if let Some(tls) = &security.tls {
                writeln!(p, "listener.name.external.ssl.keystore.type=PEM")?;
                writeln!(
                    p,
                    "listener.name.external.ssl.keystore.location={}",
                    tls.keystore.display()
                )?;
            }
        }
        writeln!(p, "listeners={listeners}")?;
        writeln!(p, "advertised.listeners={advertised}")?;
        writeln!(p, "listener.security.protocol.map={map}")?;
        writeln!(p, "log.dirs={}", self.dir.join("data").display())?;
        // A single node: internal topics cannot have more than one replica.
        writeln!(p, "offsets.topic.replication.factor=1")?;
        writeln!(p, "transaction.state.log.replication.factor=1")?;
        writeln!(p, "transaction.state.log.min.isr=1")?;
        writeln!(p, "share.coordinator.state.topic.replication.factor=1")?;
        writeln!(p, "share.coordinator.state.topic.min.isr=1")?;
        // Fewer offsets partitions: a group's first coordinator lookup waits
        // for all of them to be created.
        writeln!(p, "offsets.topic.num.partitions=3")?;
        writeln!(p, "group.initial.rebalance.delay.ms=0")?;
        writeln!(p, "auto.create.topics.enable=false")?;
        Ok(p)
    }

    /// Starts the JVM. A watchdog kills it when the test process goes away,
    /// so a shared broker (never dropped) or a crashed test leaves nothing
    /// running.
    pub(super) fn spawn(&self) -> anyhow::Result<Child> {
        for port in [Some(self.internal_port), Some(self.controller_port), self.external_port]
            .into_iter()
            .flatten()
        {
            if TcpListener::bind(("127.0.0.1", port)).is_err() {
                bail!("port {port} for Apache Kafka is taken by another process");
            }
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())?;
        let logging = workspace_root().join("scripts/kafka/log4j2.properties");
        let child = Command::new(java()?)
            .args(["-Xms256m", "-Xmx512m", "-XX:+UseSerialGC", "-Djava.awt.headless=true"])
            .arg(format!("-Dlog4j2.configurationFile={}", logging.display()))
            .arg("-cp")
            .arg(classpath()?)
            .arg("kafka.Kafka")
            .arg(self.properties_path())
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start Apache Kafka (java)")?;
        crate::kill_after_exit(child.id());
        Ok(child)
    }
}

fn classpath() -> anyhow::Result<String> {
    Ok(format!("{}/*", kafka_libs()?.display()))
}
