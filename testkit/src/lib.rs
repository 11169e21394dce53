//! Test support shared by the services' black-box tests: real brokers
//! (Apache Kafka, or Tansu with `TEST_BROKER=tansu`; [`Broker`]), topics,
//! unique names, polling with a deadline ([`eventually`]), reading and
//! writing raw records, and the real binaries as child processes
//! ([`Service`]); a real PostgreSQL ([`Postgres`]). Nothing here mocks Kafka
//! or the database.

mod broker;
mod postgres;

pub use broker::{Broker, BrokerKind, Security, header, kafka_libs, tansu_bin};
pub use postgres::{Postgres, postgres_bin};

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

use anyhow::bail;

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

/// A TCP port on 127.0.0.1 that was free a moment ago, for a child process
/// to bind.
///
/// The port comes from below the kernel's ephemeral range: a port bound with
/// port 0 is an ephemeral one, and between this check and the child's bind any
/// outgoing connection of a concurrent test (Kafka clients open many) may take
/// it. Below the range only another `free_port` caller competes, and each
/// process walks its own sequence starting from an offset of its pid.
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let (low, high) = ports_below_ephemeral_range();
    let span = u64::from(high - low);
    let start = u64::from(std::process::id()) * 97;
    for _ in 0..span {
        let port = low + ((start + NEXT.fetch_add(1, Ordering::Relaxed)) % span) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The ports from 10000 up to the kernel's ephemeral range (Linux's
/// `ip_local_port_range`; 32768 where it cannot be read).
fn ports_below_ephemeral_range() -> (u16, u16) {
    let first_ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    (10_000, first_ephemeral.max(10_001))
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

/// The workspace's root folder (where `scripts/` and `.tools/` are).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("testkit lives in the workspace")
        .to_owned()
}

/// Kills `pid` with SIGKILL once this test process has exited, so a shared
/// broker (never dropped) or a crashed test leaves nothing running.
pub(crate) fn kill_after_exit(pid: u32) {
    watch_parent(&format!("kill -9 {pid} 2>/dev/null"), Some(pid));
}

/// Removes `dir` once this test process has exited. A shared broker lives in
/// a static that is never dropped, and a test that panics or is killed
/// skips its destructors: without this, every such run leaves its broker's
/// data (hundreds of MB) in the temporary folder until the disk fills.
pub(crate) fn remove_after_exit(dir: &Path) {
    // The pause lets the broker's own watchdog kill it first.
    watch_parent(&format!("sleep 2; rm -rf '{}'", dir.display()), None);
}

/// Runs `then` in a detached shell once this test process (or `pid`, if
/// given) has exited.
pub(crate) fn watch_parent(then: &str, pid: Option<u32>) {
    let alive = match pid {
        Some(pid) => format!(
            "kill -0 {parent} 2>/dev/null && kill -0 {pid} 2>/dev/null",
            parent = std::process::id()
        ),
        None => format!("kill -0 {} 2>/dev/null", std::process::id()),
    };
    let script = format!("while {alive}; do sleep 1; done; {then}");
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let (low, high) = ports_below_ephemeral_range();
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let mut distinct = ports.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), ports.len(), "{ports:?}");
        for port in ports {
            assert!((low..high).contains(&port), "{port} outside {low}..{high}");
            TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
        }
    }
}
