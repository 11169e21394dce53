//! notify-svc: parse configuration, start telemetry, build, consume until
//! SIGINT or SIGTERM.

use clap::Parser;
use notify_svc::{
    config::{Command, Config},
    startup::Application,
};
use service_kit::{ops, shutdown::shutdown_signal, telemetry};

// Every record allocates (librdkafka's message copy, headers, the decoded
// event, the log line), and glibc's malloc was a large share of the
// catch-up's CPU (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

// One thread: the fetch loop hands every record to a partition worker, and
// across threads each hand-off is a wake-up and a context switch that buy no
// speed (BENCHMARKS.md). Notifications are I/O-bound; librdkafka has its own
// threads.
#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Some(Command::Healthcheck) = config.command {
        ops::probe(config.metrics_addr, "/readyz", std::time::Duration::from_secs(3))?;
        return Ok(());
    }
    let telemetry = telemetry::init("notify-svc", config.log_format)?;
    let result = async {
        let app = Application::build(config).await?;
        app.run_until_stopped(shutdown_signal()).await
    }
    .await;
    if let Err(error) = &result {
        tracing::error!(error = %error, "notify-svc failed");
    }
    telemetry.shutdown();
    Ok(result?)
}
