//! Logs, spans and W3C trace context.
//!
//! [`init`] installs one subscriber per process: human-readable lines by
//! default or one JSON object per line (`LOG_FORMAT=json`), filtered by
//! `RUST_LOG` (default `info`); an OpenTelemetry layer that gives every span a
//! trace id, exporting over OTLP only when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.
//! [`inject`] and [`continue_trace`] carry a trace across Kafka in the
//! `traceparent` / `tracestate` record headers.

use std::collections::HashMap;

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{EnvFilter, Layer, filter::LevelFilter, layer::SubscriberExt, util::SubscriberInitExt};

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Why telemetry could not start.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built from the `OTEL_*` environment.
    #[error("cannot build the OTLP exporter: {0}")]
    Otlp(#[from] opentelemetry_otlp::ExporterBuildError),
    /// `RUST_LOG` does not parse.
    #[error("RUST_LOG is not a valid filter: {0}")]
    Filter(#[from] tracing_subscriber::filter::ParseError),
    /// A subscriber was installed already.
    #[error("a tracing subscriber is already installed: {0}")]
    AlreadyInstalled(#[from] tracing_subscriber::util::TryInitError),
}

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes spans.
#[derive(Debug)]
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Flushes and stops span export. Call once, at the very end.
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("telemetry shutdown: {error}");
        }
    }
}

/// Installs the process-wide subscriber. `service` names the resource in
/// exported spans.
pub fn init(service: &'static str, format: LogFormat) -> Result<Telemetry, TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::builder().parse(spec)?,
        _ => EnvFilter::new("info"),
    };
    use std::io::IsTerminal;
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    install(service, format, filter, ansi, std::io::stdout)
}

/// For tests: the same layers as [`init`], silent unless `TEST_LOG` is set.
/// Safe to call from every test; only the first call installs anything.
pub fn init_for_tests(service: &'static str) {
    let verbose = std::env::var_os("TEST_LOG").is_some();
    let filter = EnvFilter::new(if verbose {
        "debug,rdkafka=info,h2=info,hyper=info"
    } else {
        "off"
    });
    let _ = install(
        service,
        LogFormat::Text,
        filter,
        false,
        move || -> Box<dyn std::io::Write> {
            if verbose {
                Box::new(std::io::stderr())
            } else {
                Box::new(std::io::sink())
            }
        },
    );
}

fn install<W>(
    service: &'static str,
    format: LogFormat,
    filter: EnvFilter,
    ansi: bool,
    writer: W,
) -> Result<Telemetry, TelemetryError>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let mut builder =
        SdkTracerProvider::builder().with_resource(Resource::builder().with_service_name(service).build());
    if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some() {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer(service);

    let fmt = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
    // Spans reach the OpenTelemetry layer at INFO whatever RUST_LOG says, so
    // trace context keeps flowing when an operator turns logs down.
    // Without busy/idle time and thread attributes: both are work on every
    // span enter and exit (clock reads) or creation, on every call and record,
    // for attributes a trace backend already derives or rarely needs.
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_filter(LevelFilter::INFO);
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .try_init()?;
    Ok(Telemetry { provider })
}

/// The W3C trace context headers (`traceparent`, and `tracestate` when it is
/// not empty) of `span`, to put on an outgoing record.
///
/// Writes exactly what `TraceContextPropagator::inject_context` writes, without
/// its map and intermediate strings (this runs once per published record).
pub fn inject(span: &tracing::Span) -> Vec<(&'static str, String)> {
    let cx = span.context();
    let span_ref = cx.span();
    let sc = span_ref.span_context();
    let mut out = Vec::with_capacity(2);
    if !sc.is_valid() {
        return out;
    }
    out.push(("traceparent", traceparent(sc)));
    let state = sc.trace_state().header();
    if !state.is_empty() {
        out.push(("tracestate", state));
    }
    out
}

/// `00-<trace id>-<span id>-<flags>`, as the W3C propagator formats it.
fn traceparent(sc: &opentelemetry::trace::SpanContext) -> String {
    let flags = sc.trace_flags() & opentelemetry::trace::TraceFlags::SAMPLED;
    format!("00-{}-{}-{:02x}", sc.trace_id(), sc.span_id(), flags.to_u8())
}

struct Headers(HashMap<&'static str, String>);

impl Extractor for Headers {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().copied().collect()
    }
}

/// Makes `span` a child of the trace found in `header` (by name, for
/// `traceparent` and `tracestate`). Without a valid `traceparent` the span
/// keeps the new trace it started.
pub fn continue_trace(span: &tracing::Span, header: impl Fn(&str) -> Option<String>) {
    let mut found = HashMap::new();
    for name in ["traceparent", "tracestate"] {
        if let Some(v) = header(name) {
            found.insert(name, v);
        }
    }
    if found.is_empty() {
        return;
    }
    let cx = TraceContextPropagator::new().extract(&Headers(found));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// The trace id of `span` as 32 lower-case hex digits, if it has one.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    /// The hand-written traceparent is byte for byte the propagator's.
    #[test]
    fn traceparent_matches_the_propagator() {
        for flags in [TraceFlags::SAMPLED, TraceFlags::default(), TraceFlags::new(0xff)] {
            let sc = SpanContext::new(
                TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
                SpanId::from_hex("00f067aa0ba902b7").unwrap(),
                flags,
                false,
                TraceState::default(),
            );
            let cx = opentelemetry::Context::new().with_remote_span_context(sc.clone());
            let mut carrier: HashMap<String, String> = HashMap::new();
            TraceContextPropagator::new().inject_context(&cx, &mut carrier);
            assert_eq!(traceparent(&sc), carrier["traceparent"]);
        }
    }
}
