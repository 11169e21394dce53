//! Logs, spans and W3C trace context.
//!
//! [`init`] installs one subscriber per process: human-readable lines by
//! default or one JSON object per line (`LOG_FORMAT=json`), filtered by
//! `RUST_LOG` (default `info`); and the OpenTelemetry layer, which gives every
//! span a W3C trace id and span id. Text lines escape control characters in
//! what they print ([`EscapedFields`]), so one event is always one line
//! whatever its fields hold. With `OTEL_EXPORTER_OTLP_ENDPOINT` set, the
//! spans are exported over OTLP; without it the same layer runs and nothing
//! receives them, so trace context flows the same way in both cases.
//! [`inject`] and [`continue_trace`] carry a trace across gRPC, Kafka and
//! webhooks in the `traceparent` / `tracestate` headers through
//! OpenTelemetry's W3C propagator ([`HttpHeaders`], [`KafkaHeaders`]).
//!
//! Log lines go to stdout one `write(2)` each, as soon as they are formatted,
//! so a line is out of the process before the work it reports goes on. A
//! component whose lines are its product and that writes many of them (a log
//! sink) formats them the same way into a buffer of its own ([`lines_into`])
//! and writes that buffer when it chooses.

use opentelemetry::{
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_sdk::{Resource, propagation::TraceContextPropagator, trace::SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer, filter::LevelFilter, layer::SubscriberExt, registry::LookupSpan, util::SubscriberInitExt,
};

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
    install(service, format, filter, stdout_ansi(), std::io::stdout)
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
    // With the filter "off" nothing reaches the writer.
    let _ = install(service, LogFormat::Text, filter, false, std::io::stderr);
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
    let exporting = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    if exporting {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer(service);

    let fmt = fmt_layer(format, ansi, writer);
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(trace_layer(tracer))
        .try_init()?;
    Ok(Telemetry { provider })
}

/// The OpenTelemetry layer: a W3C span context for every span, recorded for
/// the exporter when there is one.
fn trace_layer<S>(tracer: opentelemetry_sdk::trace::Tracer) -> impl Layer<S>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    // Spans reach it at INFO whatever RUST_LOG says, so trace context keeps
    // flowing when an operator turns logs down.
    // Without busy/idle time, thread and source-location attributes: each is
    // work on every span (clock reads on enter and exit, allocations) for
    // attributes a trace backend derives or rarely needs. Without context
    // activation: the code passes spans explicitly ([`inject`]) and never
    // reads OpenTelemetry's current context.
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_tracked_inactivity(false)
        .with_threads(false)
        .with_location(false)
        .with_context_activation(false)
        .with_filter(LevelFilter::INFO)
}

/// Whether lines to stdout get colours: on a terminal, unless `NO_COLOR`.
fn stdout_ansi() -> bool {
    use std::io::IsTerminal;
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// The layer that formats lines, as `format` says, into `writer`.
fn fmt_layer<S, W>(format: LogFormat, ansi: bool, writer: W) -> Box<dyn Layer<S> + Send + Sync>
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let fmt = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi);
    match format {
        LogFormat::Text => fmt.fmt_fields(EscapedFields).boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    }
}

/// A dispatcher that formats the INFO (and more severe) events of `target`
/// as [`init`]'s log lines look on stdout (`format`, colours on a terminal)
/// and writes them to `writer` instead, whatever `RUST_LOG` says: for a
/// component whose lines are its product, emitted inside
/// [`tracing::dispatcher::with_default`] and written out when it chooses.
/// Every other call site stays disabled for it, so its existence costs the
/// process's other events nothing. The lines carry no span: the dispatcher
/// knows only the events it is given.
pub fn lines_into<W>(format: LogFormat, target: &'static str, writer: W) -> tracing::Dispatch
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    let only = tracing_subscriber::filter::Targets::new().with_target(target, LevelFilter::INFO);
    tracing::Dispatch::new(
        tracing_subscriber::registry().with(fmt_layer(format, stdout_ansi(), writer).with_filter(only)),
    )
}

/// The text format's fields, as tracing-subscriber's default formats them
/// (`message` bare, then `name=value`, strings quoted), with every control
/// character and Unicode line or paragraph separator escaped: a field holding
/// input from the network (a user id in an event, say) cannot start a forged
/// line or drive the terminal.
#[derive(Debug, Clone, Copy, Default)]
pub struct EscapedFields;

impl<'w> tracing_subscriber::fmt::FormatFields<'w> for EscapedFields {
    fn format_fields<R: tracing_subscriber::field::RecordFields>(
        &self,
        writer: tracing_subscriber::fmt::format::Writer<'w>,
        fields: R,
    ) -> std::fmt::Result {
        let mut visitor = EscapingVisitor {
            out: Escaped(writer),
            first: true,
            result: Ok(()),
        };
        fields.record(&mut visitor);
        visitor.result
    }
}

struct EscapingVisitor<W> {
    out: Escaped<W>,
    first: bool,
    result: std::fmt::Result,
}

impl<W: std::fmt::Write> tracing::field::Visit for EscapingVisitor<W> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.record_debug(field, &format_args!("{value}"))
        } else {
            self.record_debug(field, &value)
        }
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        use std::fmt::Write as _;
        let name = field.name();
        // Metadata of `log` records, already in the line's prefix.
        if self.result.is_err() || name.starts_with("log.") {
            return;
        }
        let pad = if std::mem::take(&mut self.first) { "" } else { " " };
        // Names are the program's own; only values are escaped.
        self.result = match name {
            "message" => write!(self.out.0, "{pad}").and_then(|()| write!(self.out, "{value:?}")),
            name => write!(self.out.0, "{pad}{}=", name.strip_prefix("r#").unwrap_or(name))
                .and_then(|()| write!(self.out, "{value:?}")),
        };
    }
}

/// Writes what it is given with control characters and Unicode line and
/// paragraph separators escaped (`\n`, `\r`, `\t`, `\u{1b}`, ...).
struct Escaped<W>(W);

impl<W: std::fmt::Write> std::fmt::Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        // Most values are printable ASCII: one pass over the bytes, no
        // character decoding.
        if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return self.0.write_str(s);
        }
        let mut rest = s;
        while let Some(at) = rest.find(needs_escape) {
            self.0.write_str(&rest[..at])?;
            let c = rest[at..].chars().next().unwrap_or_default();
            match c {
                '\n' => self.0.write_str("\\n")?,
                '\r' => self.0.write_str("\\r")?,
                '\t' => self.0.write_str("\\t")?,
                c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
            }
            rest = &rest[at + c.len_utf8()..];
        }
        self.0.write_str(rest)
    }
}

fn needs_escape(c: char) -> bool {
    c.is_control() || matches!(c, '\u{2028}' | '\u{2029}')
}

/// The W3C trace context header names, as the propagator writes them.
const W3C_HEADERS: [&str; 2] = ["traceparent", "tracestate"];

/// The W3C trace context headers (`traceparent`, and `tracestate` when it is
/// not empty) of `span`, to put on an outgoing record or request, as
/// [`TraceContextPropagator`] writes them.
pub fn inject(span: &tracing::Span) -> Vec<(&'static str, String)> {
    let cx = span.context();
    let mut headers = InjectedHeaders(Vec::with_capacity(2));
    TraceContextPropagator::new().inject_context(&cx, &mut headers);
    headers.0
}

/// Collects what the propagator injects.
struct InjectedHeaders(Vec<(&'static str, String)>);

impl Injector for InjectedHeaders {
    fn set(&mut self, key: &str, value: String) {
        // An empty `tracestate` says nothing (W3C lets a sender leave it out),
        // so a record carries no empty header.
        if let Some(name) = W3C_HEADERS.into_iter().find(|name| *name == key)
            && !value.is_empty()
        {
            self.0.push((name, value));
        }
    }
}

/// The headers of an HTTP request, or a gRPC call's metadata
/// (`request.metadata().as_ref()`), read by the propagator.
#[derive(Debug, Clone, Copy)]
pub struct HttpHeaders<'a>(pub &'a axum::http::HeaderMap);

impl Extractor for HttpHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// A Kafka record's headers (`message.headers()`), read once: each lookup
/// through librdkafka walks every header and checks its name's UTF-8, and a
/// record is asked for about ten by name (its envelope's and its trace
/// context's). Of two headers with one name, the later one counts.
#[derive(Debug, Clone, Default)]
pub struct KafkaHeaders<'a>(Vec<(&'a str, Option<&'a [u8]>)>);

impl<'a> KafkaHeaders<'a> {
    /// The headers of a record, `None` when it has none.
    pub fn of<H: rdkafka::message::Headers>(headers: Option<&'a H>) -> Self {
        Self(headers.map_or_else(Vec::new, |h| h.iter().map(|h| (h.key, h.value)).collect()))
    }

    /// The value of the last header named `name`.
    pub fn value(&self, name: &str) -> Option<&'a [u8]> {
        self.0
            .iter()
            .rev()
            .find(|(key, _)| *key == name)
            .and_then(|(_, value)| *value)
    }
}

impl Extractor for KafkaHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.value(key).and_then(|value| std::str::from_utf8(value).ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(key, _)| *key).collect()
    }
}

/// Makes `span` a child of the trace in `carrier`'s `traceparent` /
/// `tracestate`. Without a valid `traceparent` the span keeps the new trace
/// it started.
pub fn continue_trace(span: &tracing::Span, carrier: &dyn Extractor) {
    let remote = TraceContextPropagator::new().extract(carrier);
    if remote.span().span_context().is_valid() {
        let _ = span.set_parent(remote);
    }
}

/// The trace id of `span` as 32 lower-case hex digits, if it has one.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let sc = span.context().span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, io::Write, sync::Mutex};

    use super::*;

    /// A text line's fields cannot break the line: control characters in
    /// values (and in the message) are escaped, everything else is as
    /// tracing-subscriber's default format prints it.
    #[test]
    fn text_fields_escape_control_characters() {
        #[derive(Clone, Default)]
        struct Lines(std::sync::Arc<Mutex<Vec<u8>>>);
        impl Write for Lines {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let lines = Lines::default();
        let writer = lines.clone();
        let subscriber = tracing_subscriber::registry().with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .without_time()
                .fmt_fields(EscapedFields)
                .with_writer(move || writer.clone()),
        );
        tracing::subscriber::with_default(subscriber, || {
            let user = "eve\nINFO notification: order created user_id=victim\r\u{1b}[2J\u{2028}";
            let span = tracing::info_span!("event", user_id = %user, n = 1);
            span.in_scope(|| {
                tracing::info!(user_id = %user, quoted = user, total = 5, "notification: {}", user);
                tracing::info!(plain = %"demo-user", "order created");
            });
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 2, "one event, one line: {text}");
        let escaped = r"eve\nINFO notification: order created user_id=victim\r\u{1b}[2J\u{2028}";
        assert!(
            text.contains(&format!("event{{user_id={escaped} n=1}}")),
            "span fields escaped: {text}"
        );
        assert!(
            text.contains(&format!("notification: {escaped} user_id={escaped} ")),
            "{text}"
        );
        assert!(
            text.contains(r#"quoted="eve\nINFO"#),
            "strings are quoted as before: {text}"
        );
        assert!(text.contains("total=5"), "{text}");
        assert!(text.contains("order created plain=demo-user"), "{text}");
        assert!(!text.contains('\u{1b}') && !text.contains('\r'), "{text:?}");
    }

    /// A sink's dispatcher writes its target's events, formatted and escaped
    /// like the log lines, and nothing else.
    #[test]
    fn lines_into_writes_only_its_targets_events() {
        #[derive(Clone, Default)]
        struct Shared(std::sync::Arc<Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Shared::default();
        let writer = out.clone();
        let dispatch = lines_into(LogFormat::Text, "sink", move || writer.clone());
        tracing::dispatcher::with_default(&dispatch, || {
            tracing::info!(target: "sink", user_id = "eve\nINFO forged", "notification");
            tracing::info!(target: "elsewhere", "not the sink's");
            tracing::debug!(target: "sink", "finer than INFO");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.contains(r#"notification user_id="eve\nINFO forged""#), "{text}");
    }

    fn parts(headers: &[(&'static str, String)]) -> (String, String, String) {
        let (name, value) = &headers[0];
        assert_eq!(*name, "traceparent");
        let p: Vec<&str> = value.split('-').collect();
        assert_eq!((p.len(), p[0]), (4, "00"), "{value}");
        (p[1].to_owned(), p[2].to_owned(), p[3].to_owned())
    }

    const REMOTE_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

    fn remote(flags: &str) -> HashMap<String, String> {
        HashMap::from([
            (
                "traceparent".into(),
                format!("00-{REMOTE_TRACE}-00f067aa0ba902b7-{flags}"),
            ),
            ("tracestate".into(), "vendor=x".into()),
        ])
    }

    /// The subscriber [`init`] installs, without the lines: the trace layer
    /// over a provider with no exporter.
    fn traced() -> impl tracing::Subscriber {
        tracing_subscriber::registry().with(trace_layer(SdkTracerProvider::builder().build().tracer("test")))
    }

    /// Without an exporter: ids for every span, children in their parent's trace.
    #[test]
    fn spans_have_w3c_ids_and_share_their_parents_trace() {
        tracing::subscriber::with_default(traced(), || {
            let root = tracing::info_span!("root");
            let headers = inject(&root);
            assert_eq!(headers.len(), 1, "no empty tracestate: {headers:?}");
            let (trace, root_span_id, flags) = parts(&headers);
            assert_eq!(
                flags, "01",
                "a new trace is sampled, as OpenTelemetry's default sampler does"
            );
            assert_eq!(trace_id(&root).as_deref(), Some(trace.as_str()));
            let child = root.in_scope(|| tracing::info_span!("child"));
            let (child_trace, child_span_id, _) = parts(&inject(&child));
            assert_eq!(child_trace, trace);
            assert_ne!(child_span_id, root_span_id);
            let other = tracing::info_span!("other");
            assert_ne!(
                trace_id(&other),
                trace_id(&root),
                "a span with no parent starts its own trace"
            );
        });
    }

    /// A remote parent's trace id, flags and state are adopted.
    #[test]
    fn a_remote_trace_is_continued() {
        tracing::subscriber::with_default(traced(), || {
            let span = tracing::info_span!("event");
            continue_trace(&span, &remote("00"));
            let headers = inject(&span);
            let (trace, span_id, flags) = parts(&headers);
            assert_eq!(trace, REMOTE_TRACE);
            assert_ne!(
                span_id, "00f067aa0ba902b7",
                "the span is the remote span's child, not the remote span"
            );
            assert_eq!(flags, "00", "the caller's sampling decision is kept");
            assert_eq!(headers.get(1), Some(&("tracestate", "vendor=x".to_owned())));
            let child = span.in_scope(|| tracing::info_span!("child"));
            assert_eq!(trace_id(&child).as_deref(), Some(REMOTE_TRACE));

            let keeps = tracing::info_span!("keeps");
            let before = trace_id(&keeps);
            let bad = HashMap::from([("traceparent".to_owned(), "not a traceparent".to_owned())]);
            continue_trace(&keeps, &bad);
            assert_eq!(
                trace_id(&keeps),
                before,
                "an invalid header leaves the span's own trace"
            );
        });
    }

    /// gRPC metadata and Kafka record headers are read as the callers send
    /// them: the later of two record headers with one name counts, a value
    /// that is not UTF-8 is no value, and a record without headers has none.
    #[test]
    fn grpc_metadata_and_record_headers_are_carriers() {
        use rdkafka::message::{Header, OwnedHeaders};

        let mut metadata = grpc_metadata();
        let grpc = HttpHeaders(&metadata);
        assert_eq!(grpc.get("traceparent"), Some(remote("01")["traceparent"].as_str()));
        assert_eq!(grpc.get("tracestate"), Some("vendor=x"));
        metadata.insert("tracestate", axum::http::HeaderValue::from_bytes(b"v=\xff").unwrap());
        assert_eq!(HttpHeaders(&metadata).get("tracestate"), None);

        let traceparent = remote("01")["traceparent"].clone();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "traceparent",
                value: Some("00-ffffffffffffffffffffffffffffffff-00f067aa0ba902b7-01"),
            })
            .insert(Header {
                key: "traceparent",
                value: Some(traceparent.as_str()),
            })
            .insert(Header {
                key: "tracestate",
                value: Some(b"v=\xff".as_slice()),
            })
            .insert(Header::<&str> {
                key: "empty",
                value: None,
            });
        let record = KafkaHeaders::of(Some(&headers));
        assert_eq!(record.get("traceparent"), Some(traceparent.as_str()));
        assert_eq!(record.get("tracestate"), None);
        assert_eq!(record.get("empty"), None);
        assert_eq!(record.keys(), ["traceparent", "traceparent", "tracestate", "empty"]);
        assert_eq!(KafkaHeaders::of::<OwnedHeaders>(None).get("traceparent"), None);

        tracing::subscriber::with_default(traced(), || {
            let span = tracing::info_span!("event");
            continue_trace(&span, &record);
            assert_eq!(trace_id(&span).as_deref(), Some(REMOTE_TRACE));
        });
    }

    fn grpc_metadata() -> axum::http::HeaderMap {
        let mut map = axum::http::HeaderMap::new();
        for (k, v) in remote("01") {
            map.insert(
                axum::http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        map
    }
}
