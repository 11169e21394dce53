//! notify-svc: parse configuration, start telemetry, build, consume until
//! SIGINT or SIGTERM.

use clap::Parser;
use notify_svc::{config::Config, startup::Application};
use service_kit::{shutdown::shutdown_signal, telemetry};

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
    if let Some(ready) = config.service.healthcheck() {
        return Ok(ready?);
    }
    let telemetry = telemetry::init("notify-svc", config.service.log_format)?;
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
