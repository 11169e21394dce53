//! Who gets in: TLS and mutual TLS, bearer JWTs on CreateOrder, and bounded
//! inputs (message size, concurrency).

use std::{path::PathBuf, time::Duration};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use orders_contract::v1::order_service_client::OrderServiceClient;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::helpers::{TestApp, spawn_app_on, spawn_app_with, valid_request};

const SECRET: &str = "a-test-secret-that-is-at-least-32-bytes-long";

struct Pki {
    dir: tempfile::TempDir,
    ca_pem: String,
    client_cert_pem: String,
    client_key_pem: String,
    stranger_cert_pem: String,
    stranger_key_pem: String,
}

pub(crate) fn make_ca(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

pub(crate) fn leaf(
    issuer: &CertifiedIssuer<'static, KeyPair>,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    params.extended_key_usages = vec![usage];
    let cert = params.signed_by(&key, issuer).unwrap();
    (cert.pem(), key.serialize_pem())
}

impl Pki {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = make_ca("orders test CA");
        let (server_cert, server_key) = leaf(&ca, &["localhost"], ExtendedKeyUsagePurpose::ServerAuth);
        let (client_cert_pem, client_key_pem) = leaf(&ca, &["client"], ExtendedKeyUsagePurpose::ClientAuth);
        let other = make_ca("someone else's CA");
        let (stranger_cert_pem, stranger_key_pem) = leaf(&other, &["stranger"], ExtendedKeyUsagePurpose::ClientAuth);
        std::fs::write(dir.path().join("server.pem"), server_cert).unwrap();
        std::fs::write(dir.path().join("server.key"), server_key).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Pki {
            ca_pem: ca.pem(),
            dir,
            client_cert_pem,
            client_key_pem,
            stranger_cert_pem,
            stranger_key_pem,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

async fn tls_channel(
    app: &TestApp,
    pki: &Pki,
    identity: Option<(&str, &str)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    Channel::from_shared(format!("https://{}", app.grpc_addr))
        .unwrap()
        .tls_config(tls)?
        .connect()
        .await
}

async fn create_over(channel: Channel) -> Result<(), tonic::Status> {
    OrderServiceClient::new(channel)
        .create_order(valid_request("user-1"))
        .await
        .map(|_| ())
}

#[tokio::test]
async fn tls_serves_tls_only() {
    let pki = Pki::new();
    let app = spawn_app_with(|c| {
        c.grpc_tls_cert = Some(pki.path("server.pem"));
        c.grpc_tls_key = Some(pki.path("server.key"));
    })
    .await;
    create_over(tls_channel(&app, &pki, None).await.unwrap())
        .await
        .expect("TLS call works");
    let plaintext = OrderServiceClient::connect(format!("http://{}", app.grpc_addr)).await;
    let refused = match plaintext {
        Err(_) => true,
        Ok(mut client) => client.create_order(valid_request("user-1")).await.is_err(),
    };
    assert!(refused, "plaintext must be refused when TLS is on");
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_trusted_certificate() {
    let pki = Pki::new();
    let app = spawn_app_with(|c| {
        c.grpc_tls_cert = Some(pki.path("server.pem"));
        c.grpc_tls_key = Some(pki.path("server.key"));
        c.grpc_tls_client_ca = Some(pki.path("ca.pem"));
    })
    .await;
    let trusted = tls_channel(&app, &pki, Some((&pki.client_cert_pem, &pki.client_key_pem)))
        .await
        .unwrap();
    create_over(trusted)
        .await
        .expect("a client with a certificate from the CA gets in");

    let anonymous = match tls_channel(&app, &pki, None).await {
        Err(_) => true,
        Ok(channel) => create_over(channel).await.is_err(),
    };
    assert!(anonymous, "no client certificate: refused");
    let stranger = match tls_channel(&app, &pki, Some((&pki.stranger_cert_pem, &pki.stranger_key_pem))).await {
        Err(_) => true,
        Ok(channel) => create_over(channel).await.is_err(),
    };
    assert!(stranger, "a certificate from another CA: refused");
}

fn token(key: &EncodingKey, alg: Algorithm, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

async fn call_with(app: &TestApp, user: &str, token: Option<&str>) -> Result<(), tonic::Code> {
    let mut request = tonic::Request::new(valid_request(user));
    if let Some(t) = token {
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    app.client()
        .await
        .create_order(request)
        .await
        .map(|_| ())
        .map_err(|s| s.code())
}

#[tokio::test]
async fn jwt_hs256_checks_signature_time_subject_issuer_and_audience() {
    let app = spawn_app_with(|c| {
        c.auth_jwt_secret = Some(SECRET.parse().unwrap());
        c.auth_jwt_issuer = Some("https://issuer.test".into());
        c.auth_jwt_audience = Some("orders".into());
    })
    .await;
    let key = EncodingKey::from_secret(SECRET.as_bytes());
    let wrong = EncodingKey::from_secret(b"another-secret-of-at-least-32-bytes!!");
    let claims = |sub: &str, exp: i64| serde_json::json!({"sub": sub, "exp": exp, "iss": "https://issuer.test", "aud": "orders"});
    let valid = token(&key, Algorithm::HS256, claims("alice", now() + 300));

    use tonic::Code::{PermissionDenied, Unauthenticated};
    assert_eq!(
        call_with(&app, "alice", Some(&valid)).await,
        Ok(()),
        "valid token, own order"
    );
    assert_eq!(call_with(&app, "alice", None).await, Err(Unauthenticated), "missing");
    assert_eq!(
        call_with(&app, "alice", Some("not.a.jwt")).await,
        Err(Unauthenticated),
        "garbage"
    );
    let forged = token(&wrong, Algorithm::HS256, claims("alice", now() + 300));
    assert_eq!(
        call_with(&app, "alice", Some(&forged)).await,
        Err(Unauthenticated),
        "wrong signature"
    );
    let expired = token(&key, Algorithm::HS256, claims("alice", now() - 300));
    assert_eq!(
        call_with(&app, "alice", Some(&expired)).await,
        Err(Unauthenticated),
        "expired"
    );
    let early = token(
        &key,
        Algorithm::HS256,
        serde_json::json!({"sub": "alice", "exp": now() + 600, "nbf": now() + 300, "iss": "https://issuer.test", "aud": "orders"}),
    );
    assert_eq!(
        call_with(&app, "alice", Some(&early)).await,
        Err(Unauthenticated),
        "not yet valid"
    );
    let foreign = token(
        &key,
        Algorithm::HS256,
        serde_json::json!({"sub": "alice", "exp": now() + 300, "iss": "https://evil.test", "aud": "orders"}),
    );
    assert_eq!(
        call_with(&app, "alice", Some(&foreign)).await,
        Err(Unauthenticated),
        "wrong issuer"
    );
    let elsewhere = token(
        &key,
        Algorithm::HS256,
        serde_json::json!({"sub": "alice", "exp": now() + 300, "iss": "https://issuer.test", "aud": "billing"}),
    );
    assert_eq!(
        call_with(&app, "alice", Some(&elsewhere)).await,
        Err(Unauthenticated),
        "wrong audience"
    );
    assert_eq!(
        call_with(&app, "bob", Some(&valid)).await,
        Err(PermissionDenied),
        "another user's order"
    );
    let admin = token(
        &key,
        Algorithm::HS256,
        serde_json::json!({"sub": "ops", "exp": now() + 300, "iss": "https://issuer.test", "aud": "orders", "scope": "read orders:admin"}),
    );
    assert_eq!(
        call_with(&app, "bob", Some(&admin)).await,
        Ok(()),
        "admin scope may order for anyone"
    );

    // Health stays open.
    let mut health = HealthClient::new(app.channel().await);
    health
        .check(HealthCheckRequest { service: String::new() })
        .await
        .expect("health needs no token");
}

#[tokio::test]
async fn jwt_es256_with_a_public_key_file() {
    let dir = tempfile::tempdir().unwrap();
    let signer = KeyPair::generate().unwrap();
    std::fs::write(dir.path().join("jwt.pub"), signer.public_key_pem()).unwrap();
    let path = dir.path().join("jwt.pub");
    let app = spawn_app_with(|c| c.auth_jwt_public_key = Some(path)).await;
    let key = EncodingKey::from_ec_pem(signer.serialize_pem().as_bytes()).unwrap();
    let valid = token(
        &key,
        Algorithm::ES256,
        serde_json::json!({"sub": "carol", "exp": now() + 300}),
    );
    assert_eq!(call_with(&app, "carol", Some(&valid)).await, Ok(()));
    let hs = token(
        &EncodingKey::from_secret(SECRET.as_bytes()),
        Algorithm::HS256,
        serde_json::json!({"sub": "carol", "exp": now() + 300}),
    );
    assert_eq!(
        call_with(&app, "carol", Some(&hs)).await,
        Err(tonic::Code::Unauthenticated),
        "algorithm is pinned"
    );
}

#[tokio::test]
async fn an_oversized_request_gets_a_clear_code_and_the_server_keeps_serving() {
    let app = spawn_app_with(|c| c.grpc_max_message_bytes = 16 * 1024).await;
    let mut client = app.client().await;
    let mut huge = valid_request("user-1");
    huge.user_id = "u".repeat(20 * 1024);
    let status = client.create_order(huge).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::OutOfRange, "{status:?}");
    client
        .create_order(valid_request("user-1"))
        .await
        .expect("still serving");
}

#[tokio::test]
async fn calls_over_the_concurrency_limit_are_shed() {
    let app = spawn_app_with(|c| {
        c.max_concurrent_calls = 1;
        c.database_url = crate::helpers::sqlite_url();
    })
    .await;
    // With the store's write lock held by someone else, the first call holds
    // its slot until the store gives up waiting (its 5 s busy timeout).
    let _lock = crate::helpers::hold_sqlite_write_lock(&app).await;
    let mut first = app.client().await;
    let holding = tokio::spawn(async move { first.create_order(valid_request("user-1")).await });
    let shed = testkit::eventually(Duration::from_secs(2), "a call shed with RESOURCE_EXHAUSTED", || {
        let app = &app;
        async move {
            let status = app.client().await.create_order(valid_request("user-2")).await.err()?;
            (status.code() == tonic::Code::ResourceExhausted).then_some(status)
        }
    })
    .await;
    assert!(shed.message().contains("in flight"), "{}", shed.message());
    assert_eq!(holding.await.unwrap().unwrap_err().code(), tonic::Code::Unavailable);
}

#[tokio::test]
async fn kafka_sasl_scram_authenticates_and_the_password_never_shows() {
    let topic = testkit::unique("orders");
    let broker = testkit::Broker::start_with_sasl("order-svc", "s3cret-pw-42", &[(topic.as_str(), 1)])
        .await
        .unwrap();
    let sasl = |password: &str| {
        let password = password.to_owned();
        move |c: &mut order_svc::config::Config| {
            c.kafka.startup_timeout = Duration::from_secs(3);
            c.kafka.security.kafka_security_protocol = Some("sasl_plaintext".into());
            c.kafka.security.kafka_sasl_mechanism = Some("SCRAM-SHA-512".into());
            c.kafka.security.kafka_sasl_username = Some("order-svc".into());
            c.kafka.security.kafka_sasl_password = Some(password.parse().unwrap());
        }
    };
    let refused = spawn_app_on(testkit::Broker::shared().await.unwrap(), topic.clone(), |c| {
        c.kafka.security.kafka_security_protocol = Some("sasl_plaintext".into());
    })
    .await
    .expect_err("sasl without credentials is a configuration error");
    assert!(refused.to_string().contains("KAFKA_SASL_MECHANISM"), "{refused}");

    let app = spawn_app_on(broker, topic.clone(), sasl("s3cret-pw-42"))
        .await
        .expect("authenticated start");
    app.client()
        .await
        .create_order(valid_request("user-1"))
        .await
        .expect("published over SASL");
    let debug = format!("{:?}", {
        let mut c = order_svc::config::Config::for_tests("b", "t");
        sasl("s3cret-pw-42")(&mut c);
        c
    });
    assert!(
        !debug.contains("s3cret-pw-42"),
        "the password is redacted in Debug output"
    );

    let broker = app.broker.clone();
    let wrong = spawn_app_on(broker, topic, sasl("wrong-password"))
        .await
        .expect_err("wrong password: no start");
    assert!(!wrong.to_string().contains("wrong-password"), "{wrong}");
    // The broker answered: a refusal, not an outage to wait out.
    assert!(wrong.to_string().contains("refuses this configuration"), "{wrong}");
}
