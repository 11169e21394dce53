//! What the real binaries never do: print a secret (in a start-up error or in
//! `--help`).

use std::process::Command;

/// Runs workspace binary `name` with `args` and only `env` (plus PATH); waits
/// for it and returns its exit success and everything it printed.
fn run(name: &str, args: &[&str], env: &[(&str, &str)]) -> (bool, String) {
    let mut command = Command::new(testkit::bin_path(name));
    command.env_clear().env("NO_COLOR", "1").args(args);
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    for (k, v) in env {
        command.env(k, v);
    }
    let output = command.output().expect("the binary runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn a_malformed_kafka_options_is_refused_without_echoing_it() {
    for binary in ["order-svc", "notify-svc"] {
        // The second entry has no `=`: perhaps the rest of a password with a comma in it.
        let (ok, text) = run(binary, &[], &[("KAFKA_OPTIONS", "sasl.password=hunter2,oops")]);
        assert!(!ok, "{binary} refuses it:\n{text}");
        assert!(
            !text.contains("hunter2") && !text.contains("oops"),
            "{binary} echoed it:\n{text}"
        );
        assert!(
            text.contains("KAFKA_OPTIONS") && text.contains("entry 2"),
            "{binary} names the entry:\n{text}"
        );

        let (ok, text) = run(binary, &["--kafka-options", "ssl.key.password=s3cr3t,=x"], &[]);
        assert!(!ok, "{binary} refuses it:\n{text}");
        assert!(!text.contains("s3cr3t"), "{binary} echoed it:\n{text}");
        assert!(text.contains("entry 2"), "{binary} names the entry:\n{text}");
    }
}

#[test]
fn help_never_shows_a_secret_value() {
    let secrets = [
        ("KAFKA_OPTIONS", "sasl.password=opt-s3cr3t"),
        ("KAFKA_SASL_PASSWORD", "sasl-s3cr3t"),
        ("AUTH_JWT_SECRET", "jwt-s3cr3t-jwt-s3cr3t-jwt-s3cr3t-jwt"),
        ("NOTIFY_WEBHOOK_URL", "https://hooks.example/services/T0KEN-s3cr3t"),
    ];
    for binary in ["order-svc", "notify-svc"] {
        let (ok, text) = run(binary, &["--help"], &secrets);
        assert!(ok, "{binary} --help succeeds:\n{text}");
        assert!(
            text.contains("KAFKA_OPTIONS"),
            "{binary} documents KAFKA_OPTIONS:\n{text}"
        );
        assert!(!text.contains("s3cr3t"), "{binary} --help shows a secret:\n{text}");
    }
}

#[test]
fn a_rejected_webhook_url_is_not_echoed() {
    for url in ["https://hooks.example:99999/T0KEN-s3cr3t", "not a url T0KEN-s3cr3t"] {
        let (ok, text) = run("notify-svc", &[], &[("NOTIFY_WEBHOOK_URL", url)]);
        assert!(!ok, "refused:\n{text}");
        assert!(text.contains("NOTIFY_WEBHOOK_URL"), "the setting is named:\n{text}");
        assert!(!text.contains("s3cr3t"), "the URL is echoed:\n{text}");
    }
}
