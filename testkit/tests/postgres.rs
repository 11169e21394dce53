//! testkit's PostgreSQL: initdb + pg_ctl on a free port answers connections,
//! creates databases, stops and starts again on the same port and data.

use std::time::Duration;

use testkit::Postgres;

fn accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).is_ok()
}

#[tokio::test]
async fn a_server_of_its_own_starts_stops_and_starts_again() {
    let pg = Postgres::start().await.expect("PostgreSQL starts");
    assert!(accepts(pg.port()));
    let url = pg.create_database("db").await.expect("a database");
    assert!(
        url.starts_with(&format!("postgres://postgres@127.0.0.1:{}/db_", pg.port())),
        "{url}"
    );
    pg.stop().await.expect("stops");
    assert!(!accepts(pg.port()), "nothing listens while stopped");
    pg.restart().await.expect("starts again");
    assert!(accepts(pg.port()));
    // The data survived: the database name is taken.
    let name = url.rsplit('/').next().unwrap();
    assert!(pg.create_database(name).await.is_ok(), "another unique name works");
}

#[tokio::test]
async fn the_shared_server_is_one_per_test_binary() {
    let a = Postgres::shared().await.expect("starts");
    let b = Postgres::shared().await.expect("the same");
    assert_eq!(a.port(), b.port());
}
