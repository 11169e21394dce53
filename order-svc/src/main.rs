//! order-svc: parse configuration, start telemetry, build, serve until SIGINT
//! or SIGTERM.

use clap::Parser;
use order_svc::{
    config::{Command, Config},
    startup::Application,
};
use service_kit::{ops, shutdown::shutdown_signal, telemetry};

// mimalloc instead of glibc's malloc: every call allocates (h2 frames, the
// order, its event and headers, librdkafka's message copy); BENCHMARKS.md.
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
