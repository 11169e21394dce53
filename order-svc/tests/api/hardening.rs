//! What a hostile caller cannot do: pass a token without the configured
//! issuer or audience.

use jsonwebtoken::{EncodingKey, Header};
use tonic::Code;

use crate::helpers::{spawn_app_with, valid_request};

const SECRET: &str = "a-hardening-secret-that-is-at-least-32-bytes";
const ISSUER: &str = "https://issuer.test";
const AUDIENCE: &str = "orders";

fn hs256(claims: serde_json::Value) -> String {
    jsonwebtoken::encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

#[tokio::test]
async fn a_token_without_the_configured_issuer_or_audience_is_unauthenticated() {
    let app = spawn_app_with(|c| {
        c.auth_jwt_secret = Some(SECRET.parse().unwrap());
        c.auth_jwt_issuer = Some(ISSUER.into());
        c.auth_jwt_audience = Some(AUDIENCE.into());
    })
    .await;
    let mut client = app.client().await;
    let exp = time::OffsetDateTime::now_utc().unix_timestamp() + 300;
    let cases = [
        (
            "both claims",
            serde_json::json!({"sub": "alice", "exp": exp, "iss": ISSUER, "aud": AUDIENCE}),
            Code::Ok,
        ),
        (
            "no iss",
            serde_json::json!({"sub": "alice", "exp": exp, "aud": AUDIENCE}),
            Code::Unauthenticated,
        ),
        (
            "no aud",
            serde_json::json!({"sub": "alice", "exp": exp, "iss": ISSUER}),
            Code::Unauthenticated,
        ),
        (
            "neither",
            serde_json::json!({"sub": "alice", "exp": exp}),
            Code::Unauthenticated,
        ),
    ];
    for (case, claims, want) in cases {
        let mut request = tonic::Request::new(valid_request("alice"));
        request
            .metadata_mut()
            .insert("authorization", format!("Bearer {}", hs256(claims)).parse().unwrap());
        let got = client
            .create_order(request)
            .await
            .map(|_| Code::Ok)
            .unwrap_or_else(|s| s.code());
        assert_eq!(got, want, "{case}");
    }
}
