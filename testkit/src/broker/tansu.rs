//! A Tansu broker (crates.io; the broker `scripts/run.sh` starts) with sqlite
//! storage in a temporary folder.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
};

use anyhow::{Context, bail};

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

pub(super) fn log_path(dir: &Path) -> PathBuf {
    dir.join("tansu.log")
}

/// Starts Tansu on `port` with its data in `dir`, requiring SASL if
/// `authentication`.
pub(super) fn spawn(dir: &Path, port: u16, authentication: bool) -> anyhow::Result<Child> {
    let url = format!("tcp://127.0.0.1:{port}");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path(dir))?;
    let child = Command::new(tansu_bin()?)
        .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
        .args(["--storage-engine", "sqlite://tansu.db"])
        .args(authentication.then_some("--authentication"))
        // Tansu resolves the sqlite path against its working directory.
        .current_dir(dir)
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
    crate::kill_after_exit(child.id());
    Ok(child)
}

/// Creates a SCRAM user with Tansu's own CLI (which does not authenticate,
/// so it runs before authentication is switched on).
pub(super) fn create_user(port: u16, user: &str, password: &str) -> anyhow::Result<()> {
    let created = Command::new(tansu_bin()?)
        .args([
            "user",
            "create",
            user,
            password,
            "--broker",
            &format!("tcp://127.0.0.1:{port}"),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()?;
    if !created.success() {
        bail!("tansu user create failed: {created}");
    }
    Ok(())
}
