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
//! child of its parent's) and records nothing: the OpenTelemetry layer cost
//! ~6 us of CPU per call in order-svc and ~1 us per record in notify-svc's
//! catch-up (BENCHMARKS.md) for span data that was thrown away.
//! [`inject`] and [`continue_trace`] carry a trace across Kafka in the
//! `traceparent` / `tracestate` record headers, in either mode.
//!
//! Even without recording anything, a span costs its creation, enters and
//! exits, and close in the registry: in order-svc ~5 us of ~49 us of CPU per
//! call (BENCHMARKS.md). A hot path can ask [`exporting`] and, when nothing
//! exports spans, carry a [`TraceContext`] instead of a span.
//!
//! Log lines go to stdout one `write(2)` each, as soon as they are formatted,
//! so a line is out of the process before the work it reports goes on. A
//! [`LogBatch`] lets a hot path trade that for one `write(2)` per batch: while
//! one is open, lines collect in memory and are written when it closes (or
//! when [`flush_logs`] is called, or [`MAX_HELD_BYTES`] are waiting). The
//! caller must not let anything that depends on a line having been written
//! happen before it closes the batch.
//!
//! A line that cannot be written (a closed pipe, a full disk) is lost, and
//! the output is taken as broken from then on ([`lost_lines`]). A service
//! whose log lines are its product asks for [`exit_when_lines_lost`]: the next
//! [`LogBatch`] to close then ends the process instead of returning, so
//! nothing that depends on its lines having been written happens.

use std::{
    collections::HashMap,
    io::Write,
    sync::{
        Mutex, OnceLock,
        atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering},
    },
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
    use std::io::IsTerminal;
    let ansi = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    install(service, format, filter, ansi, || Stdout)
}

/// Lines waiting for the open [`LogBatch`]es to close.
static HELD: Mutex<Vec<u8>> = Mutex::new(Vec::new());
/// How many [`LogBatch`]es are open.
static BATCHES: AtomicUsize = AtomicUsize::new(0);
/// Held lines are written once this many bytes wait, batch or not.
pub const MAX_HELD_BYTES: usize = 64 * 1024;

/// While alive, log lines (from every task and thread) are held in memory
/// instead of written one `write(2)` each; dropping it writes them all in one
/// go. Lines are written in the order they were logged.
///
/// For a hot path that logs once per item and acts on the items only after
/// the batch: notify-svc's log sink writes a batch of notifications, then
/// stores their offsets, so a notification is never counted as handled while
/// its line could still be lost with the process. Call [`flush_logs`] before
/// a wait that may last (a retry's backoff, a publish to the broker), so lines
/// are not held through it.
#[derive(Debug)]
#[must_use = "lines are held only while the batch is alive"]
pub struct LogBatch(());

impl LogBatch {
    /// Opens a batch.
    pub fn open() -> Self {
        BATCHES.fetch_add(1, Ordering::SeqCst);
        Self(())
    }
}

impl Drop for LogBatch {
    /// Writes the held lines. With [`exit_when_lines_lost`] set and a line
    /// lost (in this write or any earlier one), prints why on stderr and ends
    /// the process instead of returning.
    fn drop(&mut self) {
        BATCHES.fetch_sub(1, Ordering::SeqCst);
        flush_logs();
        let code = EXIT_ON_LOST.load(Ordering::SeqCst);
        if code != 0
            && let Some(error) = lost_lines()
        {
            eprintln!(
                "log output is broken ({error}): log lines were lost; exiting with status {code} \
                 before anything that depends on them happens"
            );
            std::process::exit(code);
        }
    }
}

/// The first failure to write a log line. The output is taken as broken for
/// good from then on: a closed pipe or stdout does not come back, and a line
/// lost in between cannot be told from the ones that were written.
static LOST: OnceLock<String> = OnceLock::new();
/// The exit status [`LogBatch`] ends the process with when lines were lost;
/// 0 for none.
static EXIT_ON_LOST: AtomicI32 = AtomicI32::new(0);

/// Why log lines were lost (the first write error), if any was.
pub fn lost_lines() -> Option<&'static str> {
    LOST.get().map(String::as_str)
}

/// From now on, a [`LogBatch`] that closes after any log line could not be
/// written ends the process with exit status `code` (not 0) after saying why
/// on stderr, instead of returning to code that would act as if its lines
/// were out. For a service whose log lines are what it delivers.
pub fn exit_when_lines_lost(code: i32) {
    assert_ne!(code, 0, "a process that lost its output does not exit with success");
    EXIT_ON_LOST.store(code, Ordering::SeqCst);
}

/// Records that a line could not be written. Called with [`HELD`] locked, so
/// a batch closing after this write (whose lines may have been in it) sees it.
fn lose(error: &std::io::Error) {
    let _ = LOST.set(error.to_string());
}

/// Writes the lines held by open [`LogBatch`]es now. A failure is recorded
/// ([`lost_lines`]).
pub fn flush_logs() {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    // Through std's stdout (line-buffered): a buffer of whole lines goes out
    // in one write(2).
    if let Err(error) = write_held(&mut held, &mut std::io::stdout().lock()) {
        lose(&error);
    }
}

fn write_held(held: &mut Vec<u8>, out: &mut impl Write) -> std::io::Result<()> {
    if held.is_empty() {
        return Ok(());
    }
    let written = out.write_all(held);
    held.clear();
    if held.capacity() > 4 * MAX_HELD_BYTES {
        held.shrink_to(MAX_HELD_BYTES);
    }
    written
}

/// One line from the fmt layer: held while a [`LogBatch`] is open and there
/// is room, else written to `out` after the lines held so far (so lines keep
/// their order when the last batch closes meanwhile).
fn hold_or_write(line: &[u8], out: &mut impl Write) -> std::io::Result<()> {
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    if BATCHES.load(Ordering::SeqCst) > 0 && held.len() + line.len() <= MAX_HELD_BYTES {
        held.extend_from_slice(line);
        return Ok(());
    }
    let written = write_held(&mut held, out).and_then(|()| out.write_all(line));
    if let Err(error) = &written {
        lose(error);
    }
    written
}

/// The log writer of [`init`]: stdout, one `write(2)` per line, or held while
/// a [`LogBatch`] is open.
#[derive(Debug, Clone, Copy)]
struct Stdout;

impl Write for Stdout {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.write_all(buf)?;
        Ok(buf.len())
    }

    // The fmt layer writes each line with one `write_all`.
    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        hold_or_write(buf, &mut std::io::stdout().lock())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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

    let fmt = tracing_subscriber::fmt::layer().with_writer(writer).with_ansi(ansi);
    let fmt = match format {
        LogFormat::Text => fmt.fmt_fields(EscapedFields).boxed(),
        LogFormat::Json => fmt
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed(),
    };
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
            name => write!(self.out.0, "{pad}{}=", name.trim_start_matches("r#"))
                .and_then(|()| write!(self.out, "{value:?}")),
        };
    }
}

/// Writes what it is given with control characters and Unicode line and
/// paragraph separators escaped (`\n`, `\r`, `\t`, `\u{1b}`, ...).
struct Escaped<W>(W);

impl<W: std::fmt::Write> std::fmt::Write for Escaped<W> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
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
    use opentelemetry::trace::{SpanContext, SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    /// Lines are written at once without a batch; with one, they are held
    /// until it closes (or the cap is reached), then written in order.
    #[test]
    fn log_batch_holds_lines_until_it_closes_and_keeps_their_order() {
        let mut out = Vec::new();
        hold_or_write(b"a\n", &mut out).unwrap();
        assert_eq!(out, b"a\n", "no batch open: written at once");

        let batch = LogBatch::open();
        hold_or_write(b"b\n", &mut out).unwrap();
        hold_or_write(b"c\n", &mut out).unwrap();
        assert_eq!(out, b"a\n", "held while the batch is open");
        let big = vec![b'x'; MAX_HELD_BYTES];
        hold_or_write(&big, &mut out).unwrap();
        assert_eq!(
            &out[..7],
            b"a\nb\nc\nx",
            "over the cap: held lines first, then the line"
        );
        assert_eq!(out.len(), 6 + MAX_HELD_BYTES);
        hold_or_write(b"d\n", &mut out).unwrap();
        assert_eq!(out.len(), 6 + MAX_HELD_BYTES, "held again after the cap's write");
        let mut closed = Vec::new();
        write_held(&mut HELD.lock().unwrap(), &mut closed).unwrap();
        assert_eq!(closed, b"d\n", "a flush writes what is held");
        drop(batch);
        hold_or_write(b"e\n", &mut closed).unwrap();
        assert_eq!(closed, b"d\ne\n", "no batch open again: written at once");
    }

    /// A line that cannot be written is reported to the caller and recorded
    /// for good, so a batch closing later knows lines were lost.
    #[test]
    fn a_failed_write_is_recorded() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let error = hold_or_write(b"lost\n", &mut Broken).unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::BrokenPipe);
        assert!(lost_lines().is_some_and(|e| e.contains("pipe")), "{:?}", lost_lines());
        hold_or_write(b"written\n", &mut Vec::new()).unwrap();
        assert!(lost_lines().is_some(), "a later write does not undo the loss");
    }

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
