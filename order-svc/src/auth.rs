//! Who may create and read orders: bearer JWTs checked on every
//! `OrderService` call.
//!
//! Off unless `AUTH_JWT_SECRET` (HS256) or `AUTH_JWT_PUBLIC_KEY` (RS256 or
//! ES256) is set. Then a call needs `authorization: Bearer <JWT>` whose
//! signature, `exp` and `nbf` (and `iss` / `aud` when configured) check out,
//! else UNAUTHENTICATED; and the token's `sub` must be the order's `user_id`
//! unless it carries the admin scope, else PERMISSION_DENIED (CreateOrder,
//! ListOrders) or NOT_FOUND (GetOrder of another user's order, so an order id
//! does not reveal that the order exists). Health and reflection stay open.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tonic::metadata::MetadataMap;

use crate::{config::Config, error::Error};

/// Checks bearer tokens.
pub struct Authenticator {
    key: DecodingKey,
    validation: Validation,
    admin_scope: String,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("algorithms", &self.validation.algorithms)
            .field("admin_scope", &self.admin_scope)
            .finish_non_exhaustive()
    }
}

/// The caller a valid token names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The token's `sub`.
    pub subject: String,
    /// Whether it carries the admin scope.
    pub admin: bool,
}

impl Principal {
    /// May this caller create an order for `user_id`?
    pub fn authorize(&self, user_id: &str) -> Result<(), Error> {
        if self.admin || self.subject == user_id {
            Ok(())
        } else {
            Err(Error::PermissionDenied(format!(
                "token subject {:?} may not create orders for user {user_id:?}",
                self.subject
            )))
        }
    }
}

impl Principal {
    /// May this caller read `user_id`'s orders?
    pub fn may_read(&self, user_id: &str) -> bool {
        self.admin || self.subject == user_id
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    sub: String,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Vec<String>>,
}

impl Authenticator {
    /// The authenticator the configuration asks for, or `None` when
    /// authentication is off.
    pub fn from_config(config: &Config) -> Result<Option<Self>, Error> {
        let (key, algorithms) = match (&config.auth_jwt_secret, &config.auth_jwt_public_key) {
            (None, None) => return Ok(None),
            (Some(_), Some(_)) => {
                return Err(Error::Config(
                    "set AUTH_JWT_SECRET or AUTH_JWT_PUBLIC_KEY, not both".into(),
                ));
            }
            (Some(secret), None) => {
                if secret.expose().len() < 32 {
                    return Err(Error::Config("AUTH_JWT_SECRET must be at least 32 bytes".into()));
                }
                (
                    DecodingKey::from_secret(secret.expose().as_bytes()),
                    vec![Algorithm::HS256],
                )
            }
            (None, Some(path)) => {
                let pem = std::fs::read(path)
                    .map_err(|e| Error::Config(format!("cannot read AUTH_JWT_PUBLIC_KEY {}: {e}", path.display())))?;
                if let Ok(key) = DecodingKey::from_rsa_pem(&pem) {
                    (key, vec![Algorithm::RS256])
                } else if let Ok(key) = DecodingKey::from_ec_pem(&pem) {
                    (key, vec![Algorithm::ES256])
                } else {
                    return Err(Error::Config(format!(
                        "AUTH_JWT_PUBLIC_KEY {} is not an RSA or EC public key in PEM form",
                        path.display()
                    )));
                }
            }
        };
        let mut validation = Validation::new(algorithms[0]);
        validation.algorithms = algorithms;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = 30;
        // A configured issuer or audience is a claim the token must carry:
        // jsonwebtoken checks `iss` and `aud` only when they are present
        // unless they are also required.
        let mut required = vec!["exp", "sub"];
        match &config.auth_jwt_issuer {
            Some(iss) => {
                validation.set_issuer(&[iss]);
                required.push("iss");
            }
            None => validation.iss = None,
        }
        match &config.auth_jwt_audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Some(Self {
            key,
            validation,
            admin_scope: config.auth_admin_scope.clone(),
        }))
    }

    /// Checks the call's bearer token.
    pub fn authenticate(&self, metadata: &MetadataMap) -> Result<Principal, Error> {
        let header = metadata
            .get("authorization")
            .ok_or_else(|| Error::Unauthenticated("missing authorization: Bearer <token>".into()))?
            .to_str()
            .map_err(|_| Error::Unauthenticated("authorization header is not ASCII".into()))?;
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Error::Unauthenticated("authorization must be `Bearer <token>`".into()))?;
        let claims = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation)
            .map_err(|e| Error::Unauthenticated(format!("invalid token: {e}")))?
            .claims;
        let admin = claims
            .scope
            .iter()
            .flat_map(|s| s.split_whitespace())
            .any(|s| s == self.admin_scope)
            || claims.scp.iter().flatten().any(|s| *s == self.admin_scope);
        Ok(Principal {
            subject: claims.sub,
            admin,
        })
    }
}
