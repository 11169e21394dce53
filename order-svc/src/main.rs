//! order-svc: parse configuration, start telemetry, build, serve until SIGINT
//! or SIGTERM.

use clap::Parser;
use order_svc::{config::Config, startup::Application};
use service_kit::{shutdown::shutdown_signal, telemetry};

// mimalloc, as in notify-svc and in the benchmark's ceiling servers: one
// allocator across the services and the servers they are measured against
// keeps those comparisons about the code, not the allocator.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Some(ready) = config.service.healthcheck() {
        return Ok(ready?);
    }
    let telemetry = telemetry::init("order-svc", config.service.log_format)?;
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
