//! Where notifications go: a log line (the default) or a webhook.
//!
//! Every sink answers with a [`NotifyError`] that says whether trying again
//! can help ([`NotifyError::Transient`]) or not ([`NotifyError::Permanent`]);
//! the processor retries the first and dead-letters the second.

use std::{
    io::Write,
    sync::{Arc, Mutex},
    time::Duration,
};

use orders_contract::v1::OrderCreated;
use reqwest::StatusCode;
use serde::Serialize;

/// One line of a notification.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NotificationItem {
    /// Product SKU.
    pub sku: String,
    /// Units ordered.
    pub quantity: u32,
    /// Price of one unit in the minor unit.
    pub unit_price_minor: i64,
}

/// What a notification says: the JSON body of a webhook POST.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Notification {
    /// The event id; also the `Idempotency-Key` header.
    pub event_id: String,
    /// The order.
    pub order_id: String,
    /// Who ordered.
    pub user_id: String,
    /// What was ordered.
    pub items: Vec<NotificationItem>,
    /// Order total in the minor unit.
    pub total_minor: i64,
    /// ISO 4217 currency code.
    pub currency: String,
    /// When the order was created, RFC 3339.
    pub occurred_at: String,
    /// W3C trace id of the trace this notification belongs to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<String>,
}

impl Notification {
    /// The notification for `event`.
    pub fn from_event(event: &OrderCreated, trace_id: Option<String>) -> Self {
        let order = event.order.clone().unwrap_or_default();
        let occurred_at = event
            .occurred_at
            .as_ref()
            .and_then(orders_contract::from_timestamp)
            .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
            .unwrap_or_default();
        Self {
            event_id: event.event_id.clone(),
            order_id: order.order_id,
            user_id: order.user_id,
            items: order
                .items
                .into_iter()
                .map(|i| NotificationItem {
                    sku: i.sku,
                    quantity: i.quantity,
                    unit_price_minor: i.unit_price_minor,
                })
                .collect(),
            total_minor: order.total_minor,
            currency: order.currency,
            occurred_at,
            trace_id,
        }
    }
}

/// Why a notification was not sent.
#[derive(Debug, Clone, thiserror::Error)]
pub enum NotifyError {
    /// Worth retrying: timeouts, connection errors, 408, 429, 5xx.
    #[error("transient: {0}")]
    Transient(String),
    /// Not worth retrying: other 4xx, an unusable URL.
    #[error("permanent: {0}")]
    Permanent(String),
}

/// A notification sink.
#[derive(Debug, Clone)]
pub enum Notifier {
    /// One structured log line per notification.
    Log(LogSink),
    /// An HTTP POST of the notification as JSON.
    Webhook(Webhook),
}

impl Notifier {
    /// Sends `notification`.
    pub async fn send(&self, notification: &Notification) -> Result<(), NotifyError> {
        match self {
            Notifier::Log(sink) => {
                sink.send(notification);
                Ok(())
            }
            Notifier::Webhook(webhook) => webhook.send(notification).await,
        }
    }

    /// A short name for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Notifier::Log(_) => "log",
            Notifier::Webhook(_) => "webhook",
        }
    }
}

/// Exit status of notify-svc when the log sink's output broke (`EX_IOERR`).
pub const EXIT_OUTPUT_BROKEN: i32 = 74;

/// The log sink: one structured line per notification, formatted like the
/// service's log lines (`LOG_FORMAT`), into a buffer of its own that
/// [`flush`](Self::flush) writes to stdout.
///
/// A sent notification is only in that buffer: whoever stores a record's
/// offset flushes first, so no offset moves past a line that was not
/// written. Many lines share one `write(2)` that way, where one per line
/// was a third of a catch-up's CPU. A failed write cannot be retried or
/// dead-lettered (a closed pipe or a full disk does not come back), so the
/// caller stops the process ([`EXIT_OUTPUT_BROKEN`]) and a restart with a
/// working stdout delivers what was lost.
#[derive(Debug, Clone)]
pub struct LogSink {
    lines: Lines,
    format: tracing::Dispatch,
}

/// The lines the sink's dispatcher writes, waiting for a flush.
#[derive(Debug, Clone, Default)]
struct Lines(Arc<Mutex<Vec<u8>>>);

impl Lines {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Write for Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogSink {
    /// A sink formatting its lines as `format`.
    pub fn new(format: service_kit::telemetry::LogFormat) -> Self {
        let lines = Lines::default();
        let writer = lines.clone();
        Self {
            lines,
            format: service_kit::telemetry::lines_into(format, module_path!(), move || writer.clone()),
        }
    }

    /// Formats the line of `notification` into the buffer.
    pub fn send(&self, notification: &Notification) {
        tracing::dispatcher::with_default(&self.format, || log(notification));
    }

    /// Bytes formatted and not yet written.
    pub fn pending(&self) -> usize {
        self.lines.lock().len()
    }

    /// Writes every line formatted so far to stdout, in one `write(2)` as
    /// far as the kernel takes it. The buffer stays locked until the write
    /// has returned, so a flush that returns `Ok` means every line sent
    /// before it is out, whichever caller's flush wrote it.
    pub fn flush(&self) -> std::io::Result<()> {
        let mut lines = self.lines.lock();
        if lines.is_empty() {
            return Ok(());
        }
        let mut out = std::io::stdout().lock();
        let written = out.write_all(&lines).and_then(|()| out.flush());
        lines.clear();
        written
    }
}

/// The notification's line.
fn log(notification: &Notification) {
    tracing::info!(
        order_id = %notification.order_id,
        user_id = %notification.user_id,
        total_minor = notification.total_minor,
        currency = %notification.currency,
        items = notification.items.len(),
        event_id = %notification.event_id,
        trace_id = %notification.trace_id.as_deref().unwrap_or("-"),
        "notification: order created"
    );
}

/// POSTs notifications to a URL, reusing connections.
#[derive(Debug, Clone)]
pub struct Webhook {
    client: reqwest::Client,
    url: reqwest::Url,
}

impl Webhook {
    /// A webhook sink for `url`; each request times out after `timeout`.
    pub fn new(url: reqwest::Url, timeout: Duration) -> Result<Self, reqwest::Error> {
        let client = reqwest::Client::builder()
            // A redirected POST would be replayed as a GET without the body
            // and its 200 taken for a delivery: a 3xx is a failure instead.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("notify-svc/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { client, url })
    }

    async fn send(&self, notification: &Notification) -> Result<(), NotifyError> {
        let mut request = self
            .client
            .post(self.url.clone())
            .header("Idempotency-Key", &notification.event_id);
        // The receiver continues the event's trace (W3C trace context).
        for (name, value) in service_kit::telemetry::inject(&tracing::Span::current()) {
            request = request.header(name, value);
        }
        let response = request.json(notification).send().await.map_err(|e| {
            if e.is_builder() {
                NotifyError::Permanent(format!("cannot build the request: {}", describe(e)))
            } else {
                NotifyError::Transient(format!("request failed: {}", describe(e)))
            }
        })?;
        let status = response.status();
        // Read what little the receiver answers so the connection goes back
        // to the pool; a large or slow body is not worth waiting for.
        let mut response = response;
        let mut read = 0;
        while read < MAX_RESPONSE_BYTES {
            match response.chunk().await {
                Ok(Some(chunk)) => read += chunk.len(),
                _ => break,
            }
        }
        classify(status)
    }
}

/// How much of a response body is read (and thrown away) to reuse its connection.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The error and its causes, without the URL: webhook URLs often carry a
/// token in their path or query, and this text goes to logs and to the
/// dead-letter topic's `dlq.error.message`.
fn describe(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Sorts an HTTP status into success, transient or permanent failure.
pub fn classify(status: StatusCode) -> Result<(), NotifyError> {
    if status.is_success() {
        Ok(())
    } else if status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
    {
        Err(NotifyError::Transient(format!("webhook answered {status}")))
    } else {
        Err(NotifyError::Permanent(format!("webhook answered {status}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        assert!(classify(StatusCode::OK).is_ok());
        assert!(classify(StatusCode::NO_CONTENT).is_ok());
        for s in [500, 502, 503, 504, 408, 429] {
            let s = StatusCode::from_u16(s).unwrap();
            assert!(matches!(classify(s), Err(NotifyError::Transient(_))), "{s}");
        }
        for s in [400, 401, 403, 404, 409, 410, 422] {
            let s = StatusCode::from_u16(s).unwrap();
            assert!(matches!(classify(s), Err(NotifyError::Permanent(_))), "{s}");
        }
    }
}
