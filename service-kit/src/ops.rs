//! The operations HTTP server every service runs on `METRICS_ADDR`:
//! `/metrics` (Prometheus text format), `/healthz` (the process is alive) and
//! `/readyz` (200 only while the service can do its job), plus [`probe`], the
//! client side used by each binary's `healthcheck` subcommand so that minimal
//! container images need no curl.

use std::{
    future::Future,
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    sync::Arc,
    time::Duration,
};

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use prometheus_client::registry::Registry;

/// Tells whether the service is ready to take work.
pub type Readiness = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
struct OpsState {
    registry: Arc<Registry>,
    ready: Readiness,
}

/// The routes: `/metrics`, `/healthz`, `/readyz`.
pub fn router(registry: Arc<Registry>, ready: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .with_state(OpsState { registry, ready })
}

async fn metrics(State(state): State<OpsState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                "content-type",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [("content-type", "text/plain")],
            "encoding failed\n".into(),
        ),
    }
}

async fn readyz(State(state): State<OpsState>) -> impl IntoResponse {
    if (state.ready)() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
    }
}

/// Serves `router` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// No connection, or no answer in time.
    #[error("cannot reach {addr}: {source}")]
    Io {
        /// Where we knocked.
        addr: SocketAddr,
        /// What went wrong.
        source: std::io::Error,
    },
    /// The server answered with something other than 200.
    #[error("{path} answered {status:?}")]
    Status {
        /// The probed path.
        path: String,
        /// The status line.
        status: String,
    },
}

/// `GET path` against the ops server at `addr` (an unspecified address such
/// as `0.0.0.0` means this host); Ok on 200.
pub fn probe(addr: SocketAddr, path: &str, timeout: Duration) -> Result<(), ProbeError> {
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(if addr.is_ipv4() {
            [127, 0, 0, 1].into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    let io = |source| ProbeError::Io { addr: target, source };
    let mut stream = TcpStream::connect_timeout(&target, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n"
    )
    .map_err(io)?;
    let mut head = [0u8; 64];
    let n = stream.read(&mut head).map_err(io)?;
    let status = String::from_utf8_lossy(&head[..n])
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    if status.split_whitespace().nth(1) == Some("200") {
        Ok(())
    } else {
        Err(ProbeError::Status {
            path: path.to_owned(),
            status,
        })
    }
}
