//! The settings every service takes with the same flags and variables
//! (`METRICS_ADDR`, `SHUTDOWN_GRACE`, `LOG_FORMAT`) and the `healthcheck`
//! subcommand, flattened into each service's configuration.

use std::{net::SocketAddr, time::Duration};

use crate::{ops, telemetry::LogFormat};

/// Settings and subcommand shared by the services.
///
/// Each service listens on its own operations port by default, so that two
/// of them run side by side on one host: a service sets its default with
/// `#[command(mut_arg("metrics_addr", |a| a.default_value("0.0.0.0:PORT")))]`
/// on its configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    /// Address of the operations HTTP server (/metrics, /healthz, /readyz).
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,

    /// How long shutdown waits for the work in flight to finish (and be
    /// flushed or committed) before the process stops anyway.
    #[arg(long, env = "SHUTDOWN_GRACE", default_value = "10s", value_parser = humantime::parse_duration)]
    pub shutdown_grace: Duration,

    /// Log line format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Option<ServiceCommand>,
}

/// Subcommands every service has.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum ServiceCommand {
    /// Exit 0 if the service on METRICS_ADDR is ready, 1 otherwise (for
    /// container health checks).
    Healthcheck,
}

impl ServiceArgs {
    /// With the `healthcheck` subcommand, whether the service on
    /// `METRICS_ADDR` answers `/readyz` with 200 (the binary exits with it);
    /// `None` without it (the binary starts the service).
    pub fn healthcheck(&self) -> Option<Result<(), ops::ProbeError>> {
        let Some(ServiceCommand::Healthcheck) = self.command else {
            return None;
        };
        Some(ops::probe(self.metrics_addr, "/readyz", Duration::from_secs(3)))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Debug, Parser)]
    #[command(mut_arg("metrics_addr", |a| a.default_value("0.0.0.0:9091")))]
    struct Svc {
        #[command(flatten)]
        service: ServiceArgs,
    }

    /// A service's own default port wins over the kit's; the variables and
    /// the subcommand work through the flattened set.
    #[test]
    fn a_service_sets_its_own_default_port_and_the_rest_is_shared() {
        let svc = Svc::try_parse_from(["svc"]).unwrap();
        assert_eq!(svc.service.metrics_addr, "0.0.0.0:9091".parse().unwrap());
        assert_eq!(svc.service.shutdown_grace, Duration::from_secs(10));
        assert_eq!(svc.service.log_format, LogFormat::Text);
        assert!(svc.service.healthcheck().is_none());
        let svc =
            Svc::try_parse_from(["svc", "--log-format", "json", "--shutdown-grace", "2s", "healthcheck"]).unwrap();
        assert_eq!(svc.service.log_format, LogFormat::Json);
        assert_eq!(svc.service.shutdown_grace, Duration::from_secs(2));
        assert!(matches!(svc.service.command, Some(ServiceCommand::Healthcheck)));
        assert!(Svc::try_parse_from(["svc", "--shutdown-grace", "soon"]).is_err());
        let help = Svc::try_parse_from(["svc", "--help"]).unwrap_err().to_string();
        for shown in [
            "[env: METRICS_ADDR=]",
            "[default: 0.0.0.0:9091]",
            "[env: SHUTDOWN_GRACE=]",
            "healthcheck",
        ] {
            assert!(help.contains(shown), "{shown} in {help}");
        }
        assert!(!help.contains("9090"), "{help}");
    }

    /// The probe reports a service that does not answer.
    #[test]
    fn healthcheck_fails_when_nothing_listens() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let svc = Svc::try_parse_from(["svc", "--metrics-addr", &addr.to_string(), "healthcheck"]).unwrap();
        assert!(matches!(
            svc.service.healthcheck(),
            Some(Err(ops::ProbeError::Io { .. }))
        ));
    }
}
