//! Reading the services' Prometheus text exposition, and the notify-svc log.

use std::{collections::HashMap, path::Path, time::SystemTime};

use hdrhistogram::Histogram;

use crate::stats;

/// GETs `url` (a `/metrics` endpoint).
pub async fn scrape(client: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    Ok(client.get(url).send().await?.error_for_status()?.text().await?)
}

fn samples<'a>(text: &'a str, name: &'a str) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    text.lines().filter_map(move |line| {
        let rest = line.strip_prefix(name)?;
        let (labels, value) = if let Some(rest) = rest.strip_prefix('{') {
            let (labels, value) = rest.split_once('}')?;
            (labels, value)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            return None;
        };
        Some((labels, value.split_whitespace().next()?.parse().ok()?))
    })
}

/// The sum of every sample of `name` (0 when absent).
pub fn value(text: &str, name: &str) -> f64 {
    samples(text, name).map(|(_, v)| v).sum()
}

/// The cumulative buckets (`le`, count) of histogram `name`.
pub fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let bucket = format!("{name}_bucket");
    let mut out: Vec<(f64, f64)> = samples(text, &bucket)
        .filter_map(|(labels, v)| {
            let le = labels.split(',').find_map(|l| l.strip_prefix("le="))?;
            let le = le.trim_matches('"');
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, v))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The `q` quantile of the observations made between two scrapes of one
/// histogram, interpolated linearly inside its bucket as Prometheus'
/// `histogram_quantile` does; in seconds.
pub fn quantile_between(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, a)| {
            let b = before.iter().find(|(l, _)| l == le).map_or(0.0, |(_, b)| *b);
            (*le, a - b)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (le, count) in delta {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let share = if count > lower.1 {
                (rank - lower.1) / (count - lower.1)
            } else {
                1.0
            };
            return Some(lower.0 + (le - lower.0) * share);
        }
        lower = (le, count);
    }
    None
}

fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// End-to-end latency from the notify-svc log: for each
/// `notification: order created` line whose `order_id` is in `started`, the
/// line's timestamp minus the call's start. Returns the histogram and how
/// many tracked orders were not found.
pub fn log_end_to_end(log: &Path, started: &HashMap<String, SystemTime>) -> anyhow::Result<(Histogram<u64>, usize)> {
    let text = std::fs::read_to_string(log)?;
    let mut latency = stats::histogram();
    let mut found = 0usize;
    for line in text.lines().filter(|l| l.contains("notification: order created")) {
        let line = strip_ansi(line);
        let Some(stamp) = line.split_whitespace().next() else {
            continue;
        };
        let Ok(at) = time::OffsetDateTime::parse(stamp, &time::format_description::well_known::Rfc3339) else {
            continue;
        };
        // A span's fields, when the line has one, come first (`order_id="…"}:`),
        // the event's after.
        let start = line
            .split_whitespace()
            .filter_map(|f| f.strip_prefix("order_id="))
            .find_map(|id| started.get(id.trim_matches(|c| c == '"' || c == '}' || c == ':')));
        if let Some(start) = start {
            let at = SystemTime::from(at);
            if let Ok(d) = at.duration_since(*start) {
                stats::record(&mut latency, d);
                found += 1;
            }
        }
    }
    Ok((latency, started.len().saturating_sub(found)))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP x\nnotifications_sent_total 42\nevent_end_to_end_seconds_bucket{le=\"0.001\"} 0\nevent_end_to_end_seconds_bucket{le=\"0.01\"} 50\nevent_end_to_end_seconds_bucket{le=\"0.1\"} 100\nevent_end_to_end_seconds_bucket{le=\"+Inf\"} 100\n";

    #[test]
    fn reads_counters_and_histogram_quantiles() {
        assert_eq!(value(TEXT, "notifications_sent_total"), 42.0);
        let after = buckets(TEXT, "event_end_to_end_seconds");
        assert_eq!(after.len(), 4);
        let p50 = quantile_between(&[], &after, 0.5).unwrap();
        assert!((p50 - 0.01).abs() < 1e-9, "{p50}");
        let p99 = quantile_between(&[], &after, 0.99).unwrap();
        assert!((p99 - 0.0982).abs() < 1e-3, "{p99}");
        assert_eq!(quantile_between(&after, &after, 0.5), None);
    }

    #[test]
    fn strips_colours() {
        assert_eq!(strip_ansi("\x1b[3morder_id\x1b[0m\x1b[2m=\x1b[0mabc"), "order_id=abc");
    }

    #[test]
    fn finds_notification_lines_of_tracked_orders() {
        let dir = std::env::temp_dir().join(format!("bench-log-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let log = dir.join("notify.log");
        std::fs::write(
            &log,
            "2026-11-25T17:43:27.753575Z  INFO event{partition=2 order_id=\"abc\"}: notify_svc::notifier: notification: order created order_id=abc user_id=u\n\
             2026-11-25T17:43:27.9Z  INFO other line order_id=abc\n\
             2026-11-25T17:43:27.760575Z  INFO notify_svc::notifier: notification: order created order_id=def user_id=u\n",
        )
        .unwrap();
        let start = time::OffsetDateTime::parse(
            "2026-11-25T17:43:27.750575Z",
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap();
        let started = HashMap::from([
            ("abc".to_owned(), SystemTime::from(start)),
            ("def".to_owned(), SystemTime::from(start)),
            ("ghi".to_owned(), SystemTime::from(start)),
        ]);
        let (h, missing) = log_end_to_end(&log, &started).unwrap();
        assert_eq!(
            (h.len(), missing),
            (2, 1),
            "with and without the span's prefix; ghi never notified"
        );
        assert!((h.min() as f64 / 1e6 - 3.0).abs() < 0.01);
        assert!((h.max() as f64 / 1e6 - 10.0).abs() < 0.01);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
