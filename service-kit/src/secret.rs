//! A configuration value that must never be printed: `Debug` and `Display`
//! show `<redacted>`, so a secret cannot leak through logs, `--help` or an
//! error message by accident. And [`Quiet`], the command-line parser of
//! settings that may hold secrets: clap's own message for a rejected value
//! repeats the value.

use std::{convert::Infallible, ffi::OsStr, fmt, marker::PhantomData, str::FromStr};

/// A secret string.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself; use it, don't print it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Parses a setting with `T`'s `FromStr` and reports a rejected value by the
/// setting's flag and variable and `T`'s reason only, never the value: for
/// settings that may hold a secret (a URL with a token, a property list with a
/// password). `T::Err` must not repeat the value either. Pair it with
/// `hide_env_values = true`, which keeps the value out of `--help`.
pub struct Quiet<T>(PhantomData<fn() -> T>);

impl<T> Quiet<T> {
    /// The parser.
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<T> Default for Quiet<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T> Clone for Quiet<T> {
    fn clone(&self) -> Self {
        Self::new()
    }
}

impl<T> fmt::Debug for Quiet<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Quiet")
    }
}

impl<T> clap::builder::TypedValueParser for Quiet<T>
where
    T: FromStr + Clone + Send + Sync + 'static,
    T::Err: fmt::Display,
{
    type Value = T;

    fn parse_ref(&self, cmd: &clap::Command, arg: Option<&clap::Arg>, value: &OsStr) -> Result<T, clap::Error> {
        let invalid = |reason: &dyn fmt::Display| {
            let setting = match arg {
                Some(arg) => {
                    let flag = arg
                        .get_long()
                        .map(|l| format!("--{l}"))
                        .unwrap_or_else(|| arg.get_id().to_string());
                    match arg.get_env() {
                        Some(env) => format!("{flag} ({})", env.to_string_lossy()),
                        None => flag,
                    }
                }
                None => "a setting".to_owned(),
            };
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!("invalid value for {setting} (not shown): {reason}\n"),
            )
            .with_cmd(cmd)
        };
        let text = value.to_str().ok_or_else(|| invalid(&"not valid UTF-8"))?;
        text.parse().map_err(|e: T::Err| invalid(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_printed() {
        let s: Secret = "hunter2".parse().unwrap();
        assert_eq!(format!("{s} {s:?}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn a_rejected_value_is_not_echoed() {
        #[derive(Debug, clap::Parser)]
        struct Args {
            #[arg(long, env = "QUIET_TEST_URL", hide_env_values = true, value_parser = Quiet::<u16>::new())]
            port: Option<u16>,
        }
        use clap::Parser as _;
        let error = Args::try_parse_from(["t", "--port", "hunter2"]).unwrap_err();
        let text = error.to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("--port (QUIET_TEST_URL)"), "{text}");
        assert!(text.contains("invalid digit"), "the reason is given: {text}");
        assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
        let ok = Args::try_parse_from(["t", "--port", "8080"]).unwrap();
        assert_eq!(ok.port, Some(8080));
    }
}
