//! order-svc: parse configuration, start telemetry, build, serve until SIGINT
//! or SIGTERM.

use clap::Parser;
use order_svc::{
    config::{Command, Config},
    startup::Application,
};
use service_kit::{ops, shutdown::shutdown_signal, telemetry};

// mimalloc, as in notify-svc (where glibc's malloc was ~27% of the catch-up
// profile) and in the benchmark's ceiling servers: here it measured no change
// beyond noise, and one allocator keeps the comparison fair (BENCHMARKS.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Some(Command::Healthcheck) = config.command {
        ops::probe(config.metrics_addr, "/readyz", std::time::Duration::from_secs(3))?;
        return Ok(());
    }
    let telemetry = telemetry::init("order-svc", config.log_format)?;
    let result = async {
        let app = Application::build(config).await?;
        app.run_until_stopped(shutdown_signal()).await
    }
    .await;
    if let Err(error) = &result {
        tracing::error!(error = %error, "order-svc failed");
    }
    telemetry.shutdown();
    Ok(result?)
}
