//! Logs, spans and W3C trace context.
//!
//! [`init`] installs one subscriber per process: human-readable lines by
//! default or one JSON object per line (`LOG_FORMAT=json`), filtered by
//! `RUST_LOG` (default `info`); and W3C trace context for every span. Text
//! lines escape control characters in what they print ([`EscapedFields`]),
//! so one event is always one line whatever its fields hold. With
//! `OTEL_EXPORTER_OTLP_ENDPOINT` set, the OpenTelemetry layer records spans and
//! exports them over OTLP. Without it nothing would receive the spans, so a
//! small propagation-only layer gives each span its trace id and span id (a
//! child of its parent's) and records nothing: the OpenTelemetry layer's
//! cost per call and per record (BENCHMARKS.md) bought span data that was
//! thrown away.
//! [`inject`] and [`continue_trace`] carry a trace across Kafka in the
//! `traceparent` / `tracestate` record headers, in either mode.
//!
//! Even without recording anything, a span costs its creation, enters and
//! exits, and close in the registry; a hot path can ask [`exporting`] and,
//! when nothing exports spans, carry a [`TraceContext`] instead of a span.
//!
//! Log lines go to stdout one `write(2)` each, as soon as they are formatted,
//! so a line is out of the process before the work it reports goes on. A
//! component whose lines are its product and that writes many of them (a log
//! sink) formats them the same way into a buffer of its own ([`lines_into`])
//! and writes that buffer when it chooses.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
};

use opentelemetry::{
    propagation::{Extractor, TextMapPropagator},
    trace::{SpanContext, TraceContextExt, TraceFlags, TraceState, TracerProvider as _},
};
use opentelemetry_sdk::{
    Resource,
    propagation::TraceContextPropagator,
    trace::{IdGenerator, RandomIdGenerator, SdkTracerProvider},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::{
    EnvFilter, Layer, Registry,
    filter::LevelFilter,
    layer::SubscriberExt,
    registry::{LookupSpan, SpanData},
    util::SubscriberInitExt,
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

/// Set once a subscriber with an OTLP exporter is installed.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether this process exports spans (`OTEL_EXPORTER_OTLP_ENDPOINT`). When
/// it does not, a hot path may skip its span and carry a [`TraceContext`].
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
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
    let exporting = std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some();
    if exporting {
        let exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic().build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer(service);

    let fmt = fmt_layer(format, ansi, writer);
    // Spans reach the trace layer at INFO whatever RUST_LOG says, so trace
    // context keeps flowing when an operator turns logs down.
    // Without busy/idle time and thread attributes: both are work on every
    // span enter and exit (clock reads) or creation, on every call and record,
    // for attributes a trace backend already derives or rarely needs.
    let otel = exporting.then(|| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_tracked_inactivity(false)
            .with_threads(false)
            .with_filter(LevelFilter::INFO)
    });
    let propagation = (!exporting).then(|| Propagation.with_filter(LevelFilter::INFO));
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
        .with(otel)
        .with(propagation)
        .try_init()?;
    EXPORTING.store(exporting, Ordering::Relaxed);
    Ok(Telemetry { provider })
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

/// The W3C trace context headers (`traceparent`, and `tracestate` when it is
/// not empty) of `span`, to put on an outgoing record.
///
/// Writes exactly what `TraceContextPropagator::inject_context` writes, without
/// its map and intermediate strings (this runs once per published record).
pub fn inject(span: &tracing::Span) -> Vec<(&'static str, String)> {
    headers_of(&span_context(span))
}

/// The W3C headers of `sc`; none when it is not valid.
fn headers_of(sc: &SpanContext) -> Vec<(&'static str, String)> {
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
    let Some(remote) = remote_parent(header) else {
        return;
    };
    let adopted = with_propagated(span, |own| {
        *own = SpanContext::new(
            remote.trace_id(),
            own.span_id(),
            remote.trace_flags(),
            false,
            remote.trace_state().clone(),
        )
    });
    if adopted.is_none() {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }
}

/// The valid remote span context in the `traceparent` / `tracestate` headers.
fn remote_parent(header: impl Fn(&str) -> Option<String>) -> Option<SpanContext> {
    let mut found = HashMap::new();
    for name in ["traceparent", "tracestate"] {
        if let Some(v) = header(name) {
            found.insert(name, v);
        }
    }
    if found.is_empty() {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&Headers(found));
    let remote = cx.span().span_context().clone();
    remote.is_valid().then_some(remote)
}

/// A new span context: a child of `parent` (its trace id, flags and trace
/// state, a new span id), or the root of a new sampled trace.
fn child_of(parent: Option<&SpanContext>) -> SpanContext {
    let ids = RandomIdGenerator::default();
    match parent {
        Some(parent) => SpanContext::new(
            parent.trace_id(),
            ids.new_span_id(),
            parent.trace_flags(),
            false,
            parent.trace_state().clone(),
        ),
        None => SpanContext::new(
            ids.new_trace_id(),
            ids.new_span_id(),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
    }
}

/// The W3C trace context of one unit of work that has no span of its own
/// (see [`exporting`]): a child of the caller's context when the caller sent
/// one, else the root of a new trace. Its headers go on outgoing records
/// exactly as [`inject`] would write a span's.
#[derive(Debug, Clone)]
pub struct TraceContext(SpanContext);

impl TraceContext {
    /// Continues the trace in `header` (by name: `traceparent`, `tracestate`).
    pub fn continue_from(header: impl Fn(&str) -> Option<String>) -> Self {
        Self(child_of(remote_parent(header).as_ref()))
    }

    /// `traceparent` (and `tracestate` when not empty) for an outgoing record.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        headers_of(&self.0)
    }

    /// The trace id as 32 lower-case hex digits.
    pub fn trace_id(&self) -> String {
        self.0.trace_id().to_string()
    }
}

/// The trace id of `span` as 32 lower-case hex digits, if it has one.
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    let sc = span_context(span);
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// `span`'s W3C span context, from whichever trace layer is installed.
fn span_context(span: &tracing::Span) -> SpanContext {
    with_propagated(span, |sc| sc.clone()).unwrap_or_else(|| span.context().span().span_context().clone())
}

/// The span context the propagation-only layer keeps for a span.
#[derive(Debug, Clone)]
struct Propagated(SpanContext);

/// Runs `f` on `span`'s context kept by [`Propagation`]; `None` when that
/// layer is not installed (an exporter is) or the span is disabled.
fn with_propagated<R>(span: &tracing::Span, f: impl FnOnce(&mut SpanContext) -> R) -> Option<R> {
    span.with_subscriber(|(id, dispatch)| {
        let registry = dispatch.downcast_ref::<Registry>()?;
        let data = registry.span_data(id)?;
        let mut extensions = data.extensions_mut();
        extensions.get_mut::<Propagated>().map(|p| f(&mut p.0))
    })
    .flatten()
}

/// Gives every span a W3C span context without recording anything: a new
/// span id, and the trace id, flags and trace state of its parent span (or of
/// the remote parent [`continue_trace`] finds), or a new sampled trace.
#[derive(Debug, Clone, Copy)]
struct Propagation;

impl<S> Layer<S> for Propagation
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        _attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        let Some(span) = ctx.span(id) else { return };
        let parent = span
            .parent()
            .and_then(|p| p.extensions().get::<Propagated>().map(|p| p.0.clone()));
        let sc = child_of(parent.as_ref());
        span.extensions_mut().insert(Propagated(sc));
    }
}

#[cfg(test)]
mod tests {
    use std::{io::Write, sync::Mutex};

    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

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

    fn parts(headers: &[(&'static str, String)]) -> (String, String, String) {
        let (name, value) = &headers[0];
        assert_eq!(*name, "traceparent");
        let p: Vec<&str> = value.split('-').collect();
        assert_eq!((p.len(), p[0]), (4, "00"), "{value}");
        (p[1].to_owned(), p[2].to_owned(), p[3].to_owned())
    }

    /// Without an exporter: ids for every span, children in their parent's trace.
    #[test]
    fn propagation_only_spans_have_w3c_ids_and_share_their_parents_trace() {
        let subscriber = tracing_subscriber::registry().with(Propagation);
        tracing::subscriber::with_default(subscriber, || {
            let root = tracing::info_span!("root");
            let (trace, root_span_id, flags) = parts(&inject(&root));
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

    /// Without an exporter: a remote parent's trace id, flags and state are adopted.
    #[test]
    fn propagation_only_continues_a_remote_trace() {
        let subscriber = tracing_subscriber::registry().with(Propagation);
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("event");
            continue_trace(&span, |name| match name {
                "traceparent" => Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".into()),
                "tracestate" => Some("vendor=x".into()),
                _ => None,
            });
            let headers = inject(&span);
            let (trace, span_id, flags) = parts(&headers);
            assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
            assert_ne!(
                span_id, "00f067aa0ba902b7",
                "the span is the remote span's child, not the remote span"
            );
            assert_eq!(flags, "00", "the caller's sampling decision is kept");
            assert_eq!(headers.get(1), Some(&("tracestate", "vendor=x".to_owned())));
            let child = span.in_scope(|| tracing::info_span!("child"));
            assert_eq!(trace_id(&child).as_deref(), Some("4bf92f3577b34da6a3ce929d0e0e4736"));

            let keeps = tracing::info_span!("keeps");
            let before = trace_id(&keeps);
            continue_trace(&keeps, |_| Some("not a traceparent".into()));
            assert_eq!(
                trace_id(&keeps),
                before,
                "an invalid header leaves the span's own trace"
            );
        });
    }

    /// A unit of work without a span: the caller's trace continued exactly as
    /// a span's would be, or a new sampled trace.
    #[test]
    fn trace_context_continues_a_remote_trace_or_starts_one() {
        let remote = |name: &str| match name {
            "traceparent" => Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".to_owned()),
            "tracestate" => Some("vendor=x".to_owned()),
            _ => None,
        };
        let cx = TraceContext::continue_from(remote);
        let headers = cx.headers();
        let (trace, span_id, flags) = parts(&headers);
        assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(cx.trace_id(), trace);
        assert_ne!(
            span_id, "00f067aa0ba902b7",
            "a child of the remote span, not the remote span"
        );
        assert_ne!(
            parts(&TraceContext::continue_from(remote).headers()).1,
            span_id,
            "every unit of work has its own span id"
        );
        assert_eq!(flags, "00", "the caller's sampling decision is kept");
        assert_eq!(headers.get(1), Some(&("tracestate", "vendor=x".to_owned())));

        for header in [
            None,
            Some("not a traceparent"),
            Some("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
        ] {
            let cx = TraceContext::continue_from(|name| {
                (name == "traceparent").then(|| header.map(str::to_owned)).flatten()
            });
            let (trace, _, flags) = parts(&cx.headers());
            assert_eq!(trace.len(), 32, "{header:?}");
            assert_ne!(trace, "00000000000000000000000000000000", "{header:?}");
            assert_eq!(flags, "01", "a new trace is sampled: {header:?}");
            assert_ne!(
                TraceContext::continue_from(|_| None).trace_id(),
                cx.trace_id(),
                "each new trace is its own"
            );
        }
    }
}
