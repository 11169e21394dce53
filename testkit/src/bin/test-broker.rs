//! Starts one test broker (Apache Kafka, or Tansu with `TEST_BROKER=tansu`)
//! for suites outside Rust, with the same code the Rust tests use: prints
//! one JSON line, `{"bootstrap": "127.0.0.1:PORT", "kind": "...", "log":
//! "...", "client_options": "..."}`, then runs until its standard input
//! closes or it gets SIGTERM/SIGINT, and takes the broker down with it.

use tokio::{
    io::AsyncReadExt,
    signal::unix::{SignalKind, signal},
};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let broker = testkit::Broker::start().await?;
    println!(
        "{{\"bootstrap\": \"{}\", \"kind\": \"{:?}\", \"log\": {:?}, \"client_options\": \"{}\"}}",
        broker.addr(),
        broker.kind(),
        broker.log_path().display().to_string(),
        broker.client_options()
    );
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut stdin = tokio::io::stdin();
    let mut buf = [0u8; 64];
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            read = stdin.read(&mut buf) => if matches!(read, Ok(0) | Err(_)) { break },
        }
    }
    drop(broker);
    Ok(())
}
