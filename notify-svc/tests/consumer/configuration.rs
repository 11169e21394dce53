//! Settings that cannot work stop notify-svc before it binds or joins
//! anything, with a message naming the setting; valid flags parse as given.

use std::time::Duration;

#[tokio::test]
async fn settings_that_cannot_work_are_refused_before_anything_starts() {
    let mut config = notify_svc::config::Config::for_tests("127.0.0.1:1", "t", "g");
    config.retry_initial_delay = Duration::from_secs(5);
    config.retry_max_delay = Duration::from_secs(1);
    let error = notify_svc::startup::Application::build(config.clone())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("RETRY_INITIAL_DELAY"), "{error}");
    config.retry_initial_delay = Duration::from_millis(100);
    config.notify_webhook_timeout = Duration::ZERO;
    let error = notify_svc::startup::Application::build(config.clone())
        .await
        .unwrap_err();
    assert!(error.to_string().contains("NOTIFY_WEBHOOK_TIMEOUT"), "{error}");
    config.notify_webhook_timeout = Duration::from_secs(1);
    config.kafka.options = "enable.auto.offset.store=true".parse().unwrap();
    let error = notify_svc::startup::Application::build(config).await.unwrap_err();
    assert!(error.to_string().contains("enable.auto.offset.store"), "{error}");

    use clap::Parser;
    let parse = |args: &[&str]| notify_svc::config::Config::try_parse_from([&["notify-svc"], args].concat());
    assert!(parse(&["--retry-max-attempts", "0"]).is_err(), "at least one attempt");
    assert!(
        parse(&["--max-record-bytes", "10"]).is_err(),
        "MAX_RECORD_BYTES has a floor"
    );
    let parsed = parse(&[
        "--retry-max-attempts",
        "7",
        "--retry-initial-delay",
        "50ms",
        "--max-record-bytes",
        "2048",
    ])
    .expect("valid flags parse");
    assert_eq!(parsed.retry_max_attempts, 7);
    assert_eq!(parsed.retry_initial_delay, Duration::from_millis(50));
    assert_eq!(parsed.max_record_bytes, 2048);
}
