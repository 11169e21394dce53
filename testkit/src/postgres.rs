//! A real PostgreSQL for tests: `initdb` into a temporary directory and
//! `pg_ctl start` on a free port, no system service. [`Postgres::shared`] is
//! one server per test binary; [`Postgres::start`] is a test's own, which it
//! may stop and start again. A watchdog stops the server and removes its
//! directory when the test process exits, however it exits. The binaries
//! come from Debian's `postgresql` package (`scripts/install-tools.sh --test`
//! installs it); `PG_BIN` names another directory.
//!
//! PostgreSQL refuses to run as root: as root, the server runs as the
//! `postgres` user the package creates (through `runuser`).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{Arc, Mutex},
};

use anyhow::{Context, bail};
use tokio::sync::OnceCell;

/// The one server a test binary shares.
static SHARED: OnceCell<Postgres> = OnceCell::const_new();

/// A running PostgreSQL server (see the module docs).
#[derive(Debug, Clone)]
pub struct Postgres {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    bin: PathBuf,
    /// Kept for the server's lifetime; the watchdog removes it at exit.
    dir: PathBuf,
    port: u16,
    /// `runuser -u postgres --` when running as root.
    run_as: Option<(u32, u32)>,
    own: bool,
    running: Mutex<bool>,
}

/// The directory of `initdb` and `pg_ctl`: `PG_BIN`, `pg_config --bindir`,
/// or the newest `/usr/lib/postgresql/<version>/bin`.
pub fn postgres_bin() -> anyhow::Result<PathBuf> {
    find_bin(std::env::var_os("PG_BIN").map(PathBuf::from))
}

fn find_bin(pg_bin: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let has_tools = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = pg_bin {
        if has_tools(&dir) {
            return Ok(dir);
        }
        bail!("PG_BIN={} has no initdb and pg_ctl", dir.display());
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_tools(&dir) {
            return Ok(dir);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let version = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            has_tools(&bin).then_some((version, bin))
        })
        .collect();
    versions.sort();
    match versions.pop() {
        Some((_, bin)) => Ok(bin),
        None => bail!(
            "PostgreSQL's initdb and pg_ctl were not found (PG_BIN, pg_config, /usr/lib/postgresql/*/bin): \
             run scripts/install-tools.sh --test, or apt-get install postgresql"
        ),
    }
}

fn id(args: &[&str]) -> anyhow::Result<u32> {
    let out = Command::new("id").args(args).output().context("cannot run id")?;
    if !out.status.success() {
        bail!("id {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

impl Inner {
    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        match self.run_as {
            Some(_) => {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(path);
                c
            }
            None => Command::new(path),
        }
    }

    fn run(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let out = self
            .command(tool)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("cannot run {tool}"))?;
        if !out.status.success() {
            bail!(
                "{tool} {} failed: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    fn data(&self) -> String {
        self.dir.join("data").display().to_string()
    }

    fn pg_start(&self) -> anyhow::Result<()> {
        // fsync off: the tests kill order-svc, never the machine, so a
        // server that exits (even with SIGKILL) loses nothing it committed.
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off -c max_connections=200",
            self.port,
            self.dir.display()
        );
        let log = self.dir.join("postgres.log").display().to_string();
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data(),
                "-o",
                &options,
                "-l",
                &log,
                "-w",
                "-t",
                "60",
                "start",
            ],
        )?;
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = true;
        Ok(())
    }

    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }
}

impl Postgres {
    /// The server this test binary shares, started on first use.
    pub async fn shared() -> anyhow::Result<Self> {
        SHARED
            .get_or_try_init(|| async { Self::launch(false).await })
            .await
            .cloned()
    }

    /// A server of this test's own, which it may stop and start.
    pub async fn start() -> anyhow::Result<Self> {
        Self::launch(true).await
    }

    async fn launch(own: bool) -> anyhow::Result<Self> {
        tokio::task::spawn_blocking(move || Self::launch_blocking(own)).await?
    }

    fn launch_blocking(own: bool) -> anyhow::Result<Self> {
        let bin = postgres_bin()?;
        let run_as = if id(&["-u"])? == 0 {
            Some((
                id(&["-u", "postgres"]).context("running as root needs the postgres user")?,
                id(&["-g", "postgres"])?,
            ))
        } else {
            None
        };
        // Not a TempDir: the watchdog removes it after the server is gone,
        // also for the shared server, which is never dropped.
        let dir = tempfile::Builder::new().prefix("testkit-pg-").tempdir()?.keep();
        if let Some((uid, gid)) = run_as {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
        }
        let inner = Inner {
            bin,
            dir,
            port: crate::free_port(),
            run_as,
            own,
            running: Mutex::new(false),
        };
        inner.run(
            "initdb",
            &[
                "-D",
                &inner.data(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        )?;
        inner.pg_start()?;
        let pid = inner
            .postmaster_pid()
            .context("PostgreSQL started but wrote no postmaster.pid")?;
        watchdog(pid, &inner.dir);
        Ok(Self { inner: Arc::new(inner) })
    }

    /// The server's port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// The URL of database `name` on this server.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{name}", self.inner.port)
    }

    /// Creates an empty database named after `prefix` (made unique) and
    /// returns its URL.
    pub async fn create_database(&self, prefix: &str) -> anyhow::Result<String> {
        let name = crate::unique(prefix)
            .replace(|c: char| !c.is_ascii_alphanumeric(), "_")
            .to_lowercase();
        let (inner, port) = (self.inner.clone(), self.inner.port.to_string());
        let db = name.clone();
        tokio::task::spawn_blocking(move || {
            inner.run("createdb", &["-h", "127.0.0.1", "-p", &port, "-U", "postgres", &db])
        })
        .await??;
        Ok(self.url(&name))
    }

    fn assert_own(&self, what: &str) {
        assert!(
            self.inner.own,
            "{what} needs a server of the test's own (Postgres::start)"
        );
    }

    /// Stops the server at once (`pg_ctl stop -m immediate`: no checkpoint,
    /// connections cut), as when the database goes away.
    pub async fn stop(&self) -> anyhow::Result<()> {
        self.assert_own("stop");
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner.run("pg_ctl", &["-D", &inner.data(), "-m", "immediate", "-w", "stop"])?;
            *inner.running.lock().unwrap_or_else(|e| e.into_inner()) = false;
            anyhow::Ok(())
        })
        .await?
    }

    /// Starts a stopped server again on the same port and data.
    pub async fn restart(&self) -> anyhow::Result<()> {
        self.assert_own("restart");
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            inner.pg_start()?;
            if let Some(pid) = inner.postmaster_pid() {
                watchdog(pid, &inner.dir);
            }
            anyhow::Ok(())
        })
        .await?
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if *self.running.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = self.run("pg_ctl", &["-D", &self.data(), "-m", "immediate", "-w", "stop"]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Stops the postmaster `pid` (SIGQUIT: immediate shutdown, its backends
/// with it; SIGKILL if it lingers) and removes `dir` once this test process
/// has exited.
fn watchdog(pid: u32, dir: &Path) {
    let then = format!(
        "kill -QUIT {pid} 2>/dev/null; sleep 2; kill -9 {pid} 2>/dev/null; kill -0 {parent} 2>/dev/null || rm -rf '{dir}'",
        parent = std::process::id(),
        dir = dir.display()
    );
    crate::watch_parent(&then, Some(pid));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pg_bin_without_the_tools_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let error = find_bin(Some(dir.path().to_path_buf())).unwrap_err().to_string();
        assert!(error.contains("has no initdb and pg_ctl"), "{error}");
    }
}
