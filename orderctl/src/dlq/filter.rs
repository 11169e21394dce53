//! What a `dlq list` or `dlq redrive` selects: error classes, a failed-at
//! time range and order ids, parsed from flags with clear errors, plus the
//! `<partition>:<offset>` positions the commands take.

use std::{fmt, str::FromStr, time::Duration};

use time::{OffsetDateTime, format_description::well_known::Rfc3339};

use super::letter::DeadLetter;

/// The filter flags `list` and `redrive` share.
#[derive(Debug, Clone, Default, clap::Args)]
pub(crate) struct FilterArgs {
    /// Only dead letters of this error class (the dlq.error.class header, e.g.
    /// notify_permanent, retries_exhausted, malformed); repeat the flag or
    /// separate classes with commas for several.
    #[arg(long = "class", value_name = "CLASS", value_delimiter = ',', value_parser = parse_class)]
    pub(crate) classes: Vec<String>,

    /// Only dead letters that failed at or after this time: RFC 3339
    /// (2026-12-05T08:00:00Z) or a duration before now (90m, 2h, 1day).
    #[arg(long, value_name = "TIME", value_parser = TimeBound::parse)]
    pub(crate) since: Option<TimeBound>,

    /// Only dead letters that failed before this time (same forms as --since).
    #[arg(long, value_name = "TIME", value_parser = TimeBound::parse)]
    pub(crate) until: Option<TimeBound>,

    /// Only dead letters of this order id; repeat the flag or separate ids
    /// with commas for several.
    #[arg(long = "order-id", value_name = "ORDER_ID", value_delimiter = ',', value_parser = parse_order_id)]
    pub(crate) order_ids: Vec<String>,
}

/// A time as the user wrote it and the instant it means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TimeBound {
    /// As given on the command line (kept for the redrive's saved selection,
    /// so `--since 2h` resumes as `--since 2h`).
    text: String,
    at: OffsetDateTime,
}

impl TimeBound {
    /// RFC 3339, or a humantime duration before now.
    pub(crate) fn parse(s: &str) -> Result<Self, String> {
        Self::parse_at(s, OffsetDateTime::now_utc())
    }

    fn parse_at(s: &str, now: OffsetDateTime) -> Result<Self, String> {
        let text = s.trim();
        let at = match OffsetDateTime::parse(text, &Rfc3339) {
            Ok(at) => at,
            Err(rfc) => {
                let ago: Duration = humantime::parse_duration(text).map_err(|_| {
                    format!(
                        "{text:?} is neither an RFC 3339 time (2026-12-05T08:00:00Z: {rfc}) nor a duration before now (90m, 2h)"
                    )
                })?;
                now.checked_sub(time::Duration::try_from(ago).map_err(|e| format!("{text:?}: {e}"))?)
                    .ok_or_else(|| format!("{text:?} reaches before year -9999"))?
            }
        };
        Ok(Self {
            text: text.to_owned(),
            at,
        })
    }
}

fn parse_class(s: &str) -> Result<String, String> {
    let class = s.trim();
    if class.is_empty() {
        return Err("an error class cannot be empty".into());
    }
    if !class.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(format!(
            "{class:?} is not an error class: classes are letters, digits and _ (notify_permanent, retries_exhausted, malformed, ...)"
        ));
    }
    Ok(class.to_owned())
}

fn parse_order_id(s: &str) -> Result<String, String> {
    let id = s.trim();
    if id.is_empty() || id.chars().any(char::is_control) {
        return Err("an order id cannot be empty or contain control characters".into());
    }
    Ok(id.to_owned())
}

/// A validated selection of dead letters.
#[derive(Debug, Clone, Default)]
pub(crate) struct Filter {
    args: FilterArgs,
}

impl TryFrom<FilterArgs> for Filter {
    type Error = String;

    fn try_from(args: FilterArgs) -> Result<Self, String> {
        if let (Some(since), Some(until)) = (&args.since, &args.until)
            && since.at >= until.at
        {
            return Err(format!(
                "--since {} is not before --until {}: the range selects nothing",
                since.text, until.text
            ));
        }
        Ok(Self { args })
    }
}

impl Filter {
    /// Whether `letter` is selected. A dead letter whose failed-at time is
    /// missing or unreadable is outside every time range; one whose value
    /// does not decode has no order id and is outside every order id filter.
    pub(crate) fn matches(&self, letter: &DeadLetter) -> bool {
        let a = &self.args;
        if !a.classes.is_empty() && !letter.error_class.as_ref().is_some_and(|c| a.classes.contains(c)) {
            return false;
        }
        if !a.order_ids.is_empty() && !letter.order_id.as_ref().is_some_and(|id| a.order_ids.contains(id)) {
            return false;
        }
        if a.since.is_some() || a.until.is_some() {
            let Some(at) = letter.failed_at_time() else {
                return false;
            };
            if a.since.as_ref().is_some_and(|s| at < s.at) || a.until.as_ref().is_some_and(|u| at >= u.at) {
                return false;
            }
        }
        true
    }
}

/// The selection in one line, as the user gave it: the redrive saves it with
/// its position and refuses to resume a position saved for another one.
impl fmt::Display for Filter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.args;
        let mut parts = Vec::new();
        if !a.classes.is_empty() {
            let mut classes = a.classes.clone();
            classes.sort();
            classes.dedup();
            parts.push(format!("class={}", classes.join(",")));
        }
        if let Some(s) = &a.since {
            parts.push(format!("since={}", s.text));
        }
        if let Some(u) = &a.until {
            parts.push(format!("until={}", u.text));
        }
        if !a.order_ids.is_empty() {
            let mut ids = a.order_ids.clone();
            ids.sort();
            ids.dedup();
            parts.push(format!("order-id={}", ids.join(",")));
        }
        if parts.is_empty() {
            f.write_str("all")
        } else {
            f.write_str(&parts.join(" "))
        }
    }
}

/// A record of the dead-letter topic, `<partition>:<offset>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    pub(crate) partition: i32,
    pub(crate) offset: i64,
}

impl FromStr for Position {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        let (p, o) = s
            .split_once(':')
            .ok_or_else(|| format!("{s:?} is not a position: expected <partition>:<offset>, e.g. 0:17"))?;
        let partition: i32 = p
            .parse()
            .map_err(|_| format!("partition {p:?} in {s:?} is not a number"))?;
        let offset: i64 = o
            .parse()
            .map_err(|_| format!("offset {o:?} in {s:?} is not a number"))?;
        if partition < 0 || offset < 0 {
            return Err(format!("{s:?}: partition and offset cannot be negative"));
        }
        Ok(Self { partition, offset })
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.partition, self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        filter: FilterArgs,
    }

    fn filter(args: &[&str]) -> Result<Filter, String> {
        let cli = Cli::try_parse_from(std::iter::once("t").chain(args.iter().copied())).map_err(|e| e.to_string())?;
        Filter::try_from(cli.filter)
    }

    fn letter(class: &str, order_id: Option<&str>, failed_at: Option<&str>) -> DeadLetter {
        DeadLetter {
            error_class: Some(class.into()),
            order_id: order_id.map(Into::into),
            failed_at: failed_at.map(Into::into),
            ..DeadLetter::default()
        }
    }

    #[test]
    fn positions_parse_and_bad_ones_say_why() {
        assert_eq!(
            "2:17".parse::<Position>(),
            Ok(Position {
                partition: 2,
                offset: 17
            })
        );
        assert_eq!(" 0:0 ".parse::<Position>().map(|p| p.to_string()), Ok("0:0".into()));
        for (bad, says) in [
            ("17", "expected <partition>:<offset>"),
            ("a:1", "partition \"a\""),
            ("1:x", "offset \"x\""),
            ("-1:3", "cannot be negative"),
            ("1:-3", "cannot be negative"),
            ("", "expected <partition>:<offset>"),
        ] {
            let err = bad.parse::<Position>().unwrap_err();
            assert!(err.contains(says), "{bad:?}: {err}");
        }
    }

    #[test]
    fn classes_and_order_ids_select() {
        let f = filter(&["--class", "notify_permanent,malformed", "--class", "retries_exhausted"]).unwrap();
        assert!(f.matches(&letter("notify_permanent", None, None)));
        assert!(f.matches(&letter("retries_exhausted", None, None)));
        assert!(!f.matches(&letter("unknown_type", None, None)));
        assert_eq!(f.to_string(), "class=malformed,notify_permanent,retries_exhausted");

        let f = filter(&["--order-id", "o-1", "--order-id=o-2"]).unwrap();
        assert!(f.matches(&letter("x", Some("o-2"), None)));
        assert!(!f.matches(&letter("x", Some("o-3"), None)));
        assert!(!f.matches(&letter("x", None, None)), "no decoded order id, no match");

        let all = filter(&[]).unwrap();
        assert!(all.matches(&DeadLetter::default()));
        assert_eq!(all.to_string(), "all");
    }

    #[test]
    fn time_range_is_half_open_and_needs_a_readable_time() {
        let f = filter(&["--since", "2026-12-05T08:00:00Z", "--until", "2026-12-05T09:00:00Z"]).unwrap();
        assert!(f.matches(&letter("c", None, Some("2026-12-05T08:00:00Z"))));
        assert!(f.matches(&letter("c", None, Some("2026-12-05T08:59:59.999Z"))));
        assert!(!f.matches(&letter("c", None, Some("2026-12-05T09:00:00Z"))));
        assert!(!f.matches(&letter("c", None, Some("2026-12-05T07:59:59Z"))));
        assert!(!f.matches(&letter("c", None, Some("yesterday"))));
        assert!(!f.matches(&letter("c", None, None)));
        assert_eq!(f.to_string(), "since=2026-12-05T08:00:00Z until=2026-12-05T09:00:00Z");
    }

    #[test]
    fn relative_times_count_back_from_now() {
        let now = OffsetDateTime::parse("2026-12-05T10:00:00Z", &Rfc3339).unwrap();
        let t = TimeBound::parse_at("90m", now).unwrap();
        assert_eq!(t.at, OffsetDateTime::parse("2026-12-05T08:30:00Z", &Rfc3339).unwrap());
        assert_eq!(t.text, "90m");
    }

    #[test]
    fn bad_filters_are_refused_with_the_reason() {
        for (args, says) in [
            (&["--since", "yesterday"][..], "neither an RFC 3339 time"),
            (&["--until", "2026-13-01T00:00:00Z"][..], "neither an RFC 3339 time"),
            (
                &["--since", "2026-12-05T09:00:00Z", "--until", "2026-12-05T08:00:00Z"][..],
                "is not before --until",
            ),
            (&["--class", ""][..], "cannot be empty"),
            (&["--class", "notify permanent"][..], "is not an error class"),
            (&["--order-id", "a\u{7}b"][..], "control characters"),
        ] {
            let err = filter(args).unwrap_err();
            assert!(err.contains(says), "{args:?}: {err}");
        }
    }
}
