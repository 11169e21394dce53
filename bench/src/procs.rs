//! Child processes (broker, services, ceiling servers) and what /proc says
//! about them: resident memory and CPU time.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

/// A child process that is killed when dropped.
#[derive(Debug)]
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    child: Child,
}

impl Proc {
    /// Starts `command` (stdin closed), killed on drop.
    pub fn spawn(name: &str, mut command: Command) -> anyhow::Result<Self> {
        command.stdin(Stdio::null()).kill_on_drop(true);
        let child = command
            .spawn()
            .map_err(|e| anyhow::anyhow!("cannot start {name}: {e}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
        })
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id().unwrap_or(0)
    }

    /// Reads stdout lines until one starts with `prefix`; returns the rest of
    /// that line.
    pub async fn wait_for_line(&mut self, prefix: &str, timeout: Duration) -> anyhow::Result<String> {
        let stdout = self
            .child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("{}: stdout is not piped", self.name))?;
        let mut lines = BufReader::new(stdout).lines();
        let found = tokio::time::timeout(timeout, async {
            while let Some(line) = lines.next_line().await? {
                if let Some(rest) = line.strip_prefix(prefix) {
                    return Ok::<_, std::io::Error>(Some(rest.trim().to_owned()));
                }
            }
            Ok(None)
        })
        .await;
        match found {
            Ok(Ok(Some(rest))) => Ok(rest),
            _ => anyhow::bail!("{} did not print {prefix:?} within {timeout:?}", self.name),
        }
    }

    /// Fails if the process has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        match self.child.try_wait()? {
            Some(status) => anyhow::bail!("{} exited: {status}", self.name),
            None => Ok(()),
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if let Some(pid) = self.child.id() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
            if tokio::time::timeout(grace, self.child.wait()).await.is_ok() {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

/// A free TCP port on 127.0.0.1 (testkit's choice, away from the ports
/// outgoing connections take).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(testkit::free_port())
}

/// Waits until something accepts connections on `addr`.
pub async fn wait_for_port(addr: SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "nothing listens on {addr} after {timeout:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A binary next to this one (`target/release/<name>`), else `name` on PATH.
pub fn sibling_binary(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(name)))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resident set size now (`VmRSS`), in MiB.
pub fn rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmRSS:").map(|k| k as f64 / 1024.0)
}

/// Peak resident set size (`VmHWM`), in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmHWM:").map(|k| k as f64 / 1024.0)
}

/// A child of this process whose working directory is `dir`.
pub fn child_in_dir(dir: &Path) -> Option<u32> {
    let me = std::process::id();
    let dir = dir.canonicalize().ok()?;
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The parent's pid is the second field after the parenthesised name.
        let ppid: u32 = stat[stat.rfind(')')? + 2..].split_whitespace().nth(1)?.parse().ok()?;
        (ppid == me && std::fs::read_link(format!("/proc/{pid}/cwd")).ok()? == dir).then_some(pid)
    })
}

/// A JVM's `-X` flags (heap and collector), from its command line.
pub fn jvm_flags(pid: u32) -> Vec<String> {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .unwrap_or_default()
        .split(|b| *b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .filter(|a| a.starts_with("-X"))
        .collect()
}

fn clock_ticks() -> f64 {
    // USER_HZ is 100 on every Linux architecture we run on.
    100.0
}

/// CPU seconds (user + system) a process has used so far.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks())
}

/// The machine's CPU jiffies: (busy, stolen, total). Busy excludes idle,
/// I/O wait and steal (time the hypervisor gave this VM's CPUs to someone
/// else); guest time is already inside user time.
fn machine_jiffies() -> Option<(u64, u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?;
    let values: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .take(8)
        .filter_map(|v| v.parse().ok())
        .collect();
    let at = |i: usize| values.get(i).copied().unwrap_or(0);
    let total: u64 = values.iter().sum();
    let steal = at(7);
    Some((total - at(3) - at(4) - steal, steal, total))
}

/// CPU use over a measured window: the machine's, and named processes'.
#[derive(Debug)]
pub struct CpuWindow {
    started: Instant,
    machine: Option<(u64, u64, u64)>,
    procs: Vec<(String, u32, Option<f64>)>,
}

impl CpuWindow {
    /// Starts a window watching `procs` (name, pid); pid 0 is skipped.
    pub fn start(procs: &[(&str, u32)]) -> Self {
        Self {
            started: Instant::now(),
            machine: machine_jiffies(),
            procs: procs
                .iter()
                .filter(|(_, pid)| *pid != 0)
                .map(|(n, pid)| ((*n).to_owned(), *pid, cpu_seconds(*pid)))
                .collect(),
        }
    }

    /// "machine 97% | broker 80% | order-svc 60% | ..." (per-process figures
    /// in % of one core; the machine's in % of all cores).
    pub fn finish(&self) -> String {
        self.report(None)
    }

    /// As [`finish`](Self::finish), each figure followed by its CPU time per
    /// item at `per_second` items/s ("order-svc 60% 41us"): the cost of one
    /// call, which moves far less between runs than a saturated throughput.
    pub fn finish_per(&self, per_second: f64) -> String {
        self.report(Some(per_second))
    }

    fn report(&self, per_second: Option<f64>) -> String {
        let wall = self.started.elapsed().as_secs_f64().max(1e-9);
        let cost = |cores: f64| match per_second {
            Some(rate) if rate > 0.0 => format!(" {:.0}us", 1e6 * cores / rate),
            _ => String::new(),
        };
        let mut parts = Vec::new();
        if let (Some((b0, s0, t0)), Some((b1, s1, t1))) = (self.machine, machine_jiffies()) {
            let total = (t1 - t0).max(1) as f64;
            let share = (b1 - b0) as f64 / total;
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let stolen = (s1 - s0) as f64 / total;
            let steal = if stolen >= 0.005 {
                format!(" (steal {:.0}%)", 100.0 * stolen)
            } else {
                String::new()
            };
            parts.push(format!("machine {:.0}%{}{steal}", 100.0 * share, cost(share * cores)));
        }
        for (name, pid, before) in &self.procs {
            if let (Some(before), Some(after)) = (before, cpu_seconds(*pid)) {
                let cores = (after - before) / wall;
                parts.push(format!("{name} {:.0}%{}", 100.0 * cores, cost(cores)));
            }
        }
        parts.join(" | ")
    }
}

/// Starts a Tansu broker on 127.0.0.1:`port` with `storage` (`memory` or
/// `sqlite`, the latter in `dir`).
pub fn start_tansu(tansu: &Path, port: u16, storage: &str, dir: &Path) -> anyhow::Result<Proc> {
    let url = format!("tcp://127.0.0.1:{port}");
    let engine = match storage {
        "memory" => "memory://tansu/".to_owned(),
        "sqlite" => "sqlite://tansu.db".to_owned(),
        other => other.to_owned(),
    };
    let mut command = Command::new(tansu);
    command
        .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
        .args(["--storage-engine", &engine])
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("tansu.log"))?);
    Proc::spawn("tansu", command)
}

/// Which CPUs each part of a run may use. Shared: everything everywhere,
/// as on a small machine where the services share it with the broker.
/// Pinned: the server under test (a ceiling server or a service) on cores
/// of its own, so its throughput is its own cost and not the broker's or
/// the generator's; the broker and the generator (this process, which also
/// runs the raw ceilings) on the others.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Placement {
    /// No affinity set.
    Shared,
    /// CPU lists as `taskset -c` takes them.
    Pinned {
        /// The server under test.
        server: String,
        /// The broker.
        broker: String,
        /// This process: load generator and raw clients.
        generator: String,
    },
}

impl Placement {
    /// Pinned when `pin` says so, or by default on 4 or more CPUs; shared
    /// otherwise. Pinning needs at least two CPUs.
    pub fn plan(pin: Option<bool>) -> anyhow::Result<Self> {
        Self::plan_for(&allowed_cpus()?, pin)
    }

    fn plan_for(cpus: &[usize], pin: Option<bool>) -> anyhow::Result<Self> {
        let n = cpus.len();
        if !pin.unwrap_or(n >= 4) {
            return Ok(Self::Shared);
        }
        anyhow::ensure!(n >= 2, "--pin needs at least 2 CPUs, this process may use {n}");
        // Two server cores from 8 up, as in the pinned run of issue 20.
        let (rest, server) = cpus.split_at(n - if n >= 8 { 2 } else { 1 });
        // With fewer than 3 left, broker and generator share them; else the
        // broker gets a third (the generator drives three servers and the raw
        // clients, and runs more threads).
        let (broker, generator) = if rest.len() < 3 {
            (rest, rest)
        } else {
            rest.split_at(rest.len() / 3)
        };
        Ok(Self::Pinned {
            server: cpu_list(server),
            broker: cpu_list(broker),
            generator: cpu_list(generator),
        })
    }

    /// "pinned: server on CPU 1, broker on 0, load generator on 0" for the report.
    pub fn describe(&self) -> String {
        match self {
            Self::Shared => "shared: no CPU affinity, every process on every CPU".into(),
            Self::Pinned {
                server,
                broker,
                generator,
            } => {
                format!("pinned: server under test on CPU {server}, broker on {broker}, load generator on {generator}")
            }
        }
    }

    /// Pins this process (every thread, and so whatever it starts later) to
    /// the generator's CPUs.
    pub fn pin_generator(&self) -> anyhow::Result<()> {
        match self {
            Self::Shared => Ok(()),
            Self::Pinned { generator, .. } => pin(std::process::id(), generator),
        }
    }

    /// Pins a running broker (every thread) to the broker's CPUs.
    pub fn pin_broker(&self, pid: u32) -> anyhow::Result<()> {
        match self {
            Self::Pinned { broker, .. } if pid != 0 => pin(pid, broker),
            _ => Ok(()),
        }
    }

    /// A command running `program` as a server under test: through
    /// `taskset -c` (which execs it, so the pid is the server's) when pinned.
    pub fn server_command(&self, program: &Path) -> Command {
        match self {
            Self::Shared => Command::new(program),
            Self::Pinned { server, .. } => {
                let mut command = Command::new("taskset");
                command.args(["-c", server]).arg(program);
                command
            }
        }
    }
}

/// Sets the CPU affinity of every thread of `pid` with util-linux's
/// `taskset` (the workspace forbids the `unsafe` a direct
/// `sched_setaffinity` would need).
fn pin(pid: u32, cpus: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new("taskset")
        .args(["-a", "-p", "-c", cpus, &pid.to_string()])
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run taskset (util-linux): {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "taskset -a -p -c {cpus} {pid} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// The CPUs this process may run on (`Cpus_allowed_list` in /proc).
fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .ok_or_else(|| anyhow::anyhow!("/proc/self/status has no Cpus_allowed_list"))?;
    parse_cpu_list(list.trim())
}

/// "0-2,5" -> [0, 1, 2, 5].
fn parse_cpu_list(list: &str) -> anyhow::Result<Vec<usize>> {
    let mut cpus = Vec::new();
    for part in list.split(',').filter(|p| !p.is_empty()) {
        let bad = || anyhow::anyhow!("not a CPU list: {list:?}");
        match part.split_once('-') {
            Some((a, b)) => cpus.extend(a.parse::<usize>().map_err(|_| bad())?..=b.parse().map_err(|_| bad())?),
            None => cpus.push(part.parse().map_err(|_| bad())?),
        }
    }
    Ok(cpus)
}

/// [0, 1, 2, 5] -> "0,1,2,5".
fn cpu_list(cpus: &[usize]) -> String {
    cpus.iter().map(usize::to_string).collect::<Vec<_>>().join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(parse_cpu_list("0-2,5").unwrap(), vec![0, 1, 2, 5]);
        assert_eq!(parse_cpu_list("3").unwrap(), vec![3]);
        assert!(parse_cpu_list("a-b").is_err());
        assert_eq!(cpu_list(&[0, 1, 5]), "0,1,5");
    }

    #[test]
    fn the_server_gets_cores_of_its_own() {
        let pinned = |s: &str, b: &str, g: &str| Placement::Pinned {
            server: s.into(),
            broker: b.into(),
            generator: g.into(),
        };
        assert_eq!(Placement::plan_for(&[0, 1], None).unwrap(), Placement::Shared);
        assert_eq!(Placement::plan_for(&[0, 1], Some(true)).unwrap(), pinned("1", "0", "0"));
        assert_eq!(
            Placement::plan_for(&[0, 1, 2, 3], None).unwrap(),
            pinned("3", "0", "1,2")
        );
        assert_eq!(
            Placement::plan_for(&[0, 1, 2, 3], Some(false)).unwrap(),
            Placement::Shared
        );
        let all: Vec<usize> = (0..16).collect();
        assert_eq!(
            Placement::plan_for(&all, None).unwrap(),
            pinned("14,15", "0,1,2,3", "4,5,6,7,8,9,10,11,12,13")
        );
        assert!(Placement::plan_for(&[0], Some(true)).is_err());
    }
}
