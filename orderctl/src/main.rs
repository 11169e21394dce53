//! orderctl: a small command-line client for `orders.v1.OrderService`, for
//! people and scripts that do not have grpcurl at hand.
//!
//! ```text
//! orderctl create --user u-1 --currency EUR --item SKU-1:2:1999
//! orderctl get 0191d3c4-...
//! orderctl list --user u-1 --page-size 20
//! orderctl health
//! orderctl dlq list --class notify_permanent
//! orderctl dlq redrive --class notify_permanent
//! ```

mod dlq;
mod orders;

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use orders_contract::v1::{CreateOrderRequest, LineItem, order_service_client::OrderServiceClient};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Talk to order-svc.
#[derive(Debug, Parser)]
#[command(name = "orderctl", version)]
struct Cli {
    /// order-svc's gRPC address (https:// for TLS).
    #[arg(
        long,
        env = "ORDER_SVC_ADDR",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    addr: String,
    /// CA certificate (PEM) to trust for TLS.
    #[arg(long, global = true)]
    ca_cert: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true, requires = "key")]
    cert: Option<std::path::PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, global = true, requires = "cert")]
    key: Option<std::path::PathBuf>,
    /// Bearer token (JWT) to send as `authorization`.
    #[arg(long, env = "ORDER_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Create an order and print it.
    Create {
        /// The user placing the order.
        #[arg(long)]
        user: String,
        /// ISO 4217 currency code.
        #[arg(long, default_value = "EUR")]
        currency: String,
        /// A line, as SKU:QUANTITY:UNIT_PRICE_MINOR (repeat for more lines).
        #[arg(long = "item", required = true, value_parser = parse_item)]
        items: Vec<LineItem>,
        /// Idempotency key: retries with the same key create one order.
        #[arg(long, default_value = "")]
        request_id: String,
    },
    /// Read one order back and print it.
    Get(orders::GetArgs),
    /// List a user's orders, newest first.
    List(orders::ListArgs),
    /// Check order-svc's gRPC health (overall).
    Health,
    /// The dead-letter topic: list, show and redrive dead letters (talks to
    /// Kafka, not to order-svc).
    Dlq(Box<dlq::DlqArgs>),
}

fn parse_item(s: &str) -> Result<LineItem, String> {
    let parts: Vec<&str> = s.rsplitn(3, ':').collect();
    let [price, quantity, sku] = parts.as_slice() else {
        return Err(format!("expected SKU:QUANTITY:UNIT_PRICE_MINOR, got {s:?}"));
    };
    Ok(LineItem {
        sku: (*sku).to_owned(),
        quantity: quantity.parse().map_err(|e| format!("quantity {quantity:?}: {e}"))?,
        unit_price_minor: price.parse().map_err(|e| format!("unit price {price:?}: {e}"))?,
    })
}

async fn channel(cli: &Cli) -> anyhow::Result<Channel> {
    let mut endpoint = Endpoint::from_shared(cli.addr.clone())?.connect_timeout(Duration::from_secs(5));
    if cli.addr.starts_with("https://") || cli.ca_cert.is_some() {
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = &cli.ca_cert {
            tls = tls.ca_certificate(Certificate::from_pem(std::fs::read(ca).context("reading --ca-cert")?));
        }
        if let (Some(cert), Some(key)) = (&cli.cert, &cli.key) {
            tls = tls.identity(Identity::from_pem(
                std::fs::read(cert).context("reading --cert")?,
                std::fs::read(key).context("reading --key")?,
            ));
        }
        endpoint = endpoint.tls_config(tls)?;
    }
    endpoint
        .connect()
        .await
        .with_context(|| format!("cannot connect to {}", cli.addr))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    if let Cmd::Dlq(args) = &cli.command {
        return Ok(dlq::run(args).await?);
    }
    let channel = channel(&cli).await?;
    match &cli.command {
        Cmd::Create {
            user,
            currency,
            items,
            request_id,
        } => {
            let mut request = tonic::Request::new(CreateOrderRequest {
                user_id: user.clone(),
                currency: currency.clone(),
                items: items.clone(),
                request_id: request_id.clone(),
            });
            request.set_timeout(Duration::from_secs(15));
            if let Some(token) = &cli.token {
                request
                    .metadata_mut()
                    .insert("authorization", format!("Bearer {token}").parse()?);
            }
            let order = match OrderServiceClient::new(channel).create_order(request).await {
                Ok(response) => response.into_inner().order.unwrap_or_default(),
                Err(status) => bail!("CreateOrder failed: {:?}: {}", status.code(), status.message()),
            };
            println!(
                "order_id={} user_id={} total_minor={} currency={} items={}",
                order.order_id,
                order.user_id,
                order.total_minor,
                order.currency,
                order.items.len()
            );
        }
        Cmd::Health => {
            let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
            let status = client
                .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                .await
                .map_err(|s| anyhow::anyhow!("health check failed: {:?}: {}", s.code(), s.message()))?
                .into_inner()
                .status();
            println!("{}", status.as_str_name());
            if status != tonic_health::pb::health_check_response::ServingStatus::Serving {
                std::process::exit(1);
            }
        }
        Cmd::Get(args) => orders::get(channel, cli.token.as_deref(), args).await?,
        Cmd::List(args) => orders::list(channel, cli.token.as_deref(), args).await?,
        // Handled above, without connecting to order-svc.
        Cmd::Dlq(_) => {}
    }
    Ok(())
}
