//! ListOrders pagination (AIP-158): page sizes and opaque page tokens.
//!
//! A token is the position after the page's last order (its `created_at` in
//! µs and its id), bound to the `user_id` it was made for by a check value,
//! in URL-safe base64. A token that was altered, truncated or made for another
//! user is refused as INVALID_ARGUMENT; it can never reach a query as garbage.
//! The check value is a SHA-256 prefix, not a signature: the token grants
//! nothing (authorization is checked on every call), it only has to be
//! recognisably ours and unchanged.

use base64::{Engine, engine::general_purpose::URL_SAFE_NO_PAD};
use sha2::{Digest, Sha256};

use crate::error::Error;

/// Page size when the request leaves it at 0.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Largest page; larger requests get this many.
pub const MAX_PAGE_SIZE: u32 = 1000;
/// Format version of tokens.
const VERSION: u8 = 1;
/// Bytes of the check value.
const CHECK_BYTES: usize = 8;

/// The page size a request asks for, after AIP-158's rules.
pub fn page_size(requested: i32) -> Result<u32, Error> {
    match requested {
        0 => Ok(DEFAULT_PAGE_SIZE),
        n if n < 0 => Err(Error::InvalidField {
            field: "page_size",
            description: format!("must not be negative, got {n}"),
        }),
        n => Ok(u32::try_from(n).unwrap_or(MAX_PAGE_SIZE).min(MAX_PAGE_SIZE)),
    }
}

/// Where the next page starts: after this order in newest-first order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// `created_at` of the last order of the previous page, in µs.
    pub created_at_us: i64,
    /// Its id.
    pub order_id: String,
}

fn check(user_id: &str, payload: &[u8]) -> [u8; CHECK_BYTES] {
    let mut hash = Sha256::new();
    hash.update(b"orders.v1.ListOrders page token\0");
    hash.update((user_id.len() as u64).to_be_bytes());
    hash.update(user_id.as_bytes());
    hash.update(payload);
    let digest = hash.finalize();
    let mut out = [0; CHECK_BYTES];
    out.copy_from_slice(&digest[..CHECK_BYTES]);
    out
}

/// The token of `cursor` for `user_id`'s list.
pub fn encode(user_id: &str, cursor: &Cursor) -> String {
    let mut payload = Vec::with_capacity(1 + 8 + cursor.order_id.len() + CHECK_BYTES);
    payload.push(VERSION);
    payload.extend_from_slice(&cursor.created_at_us.to_be_bytes());
    payload.extend_from_slice(cursor.order_id.as_bytes());
    let check = check(user_id, &payload);
    payload.extend_from_slice(&check);
    URL_SAFE_NO_PAD.encode(payload)
}

/// The cursor in `token` (None for the first page), or INVALID_ARGUMENT.
pub fn decode(user_id: &str, token: &str) -> Result<Option<Cursor>, Error> {
    if token.is_empty() {
        return Ok(None);
    }
    let invalid = || Error::InvalidField {
        field: "page_token",
        description: "is not a page token of this list (use next_page_token as returned, with the same user_id)".into(),
    };
    // Far longer than any token we make: refuse before decoding.
    if token.len() > 512 {
        return Err(invalid());
    }
    let bytes = URL_SAFE_NO_PAD.decode(token).map_err(|_| invalid())?;
    if bytes.len() < 1 + 8 + CHECK_BYTES {
        return Err(invalid());
    }
    let (payload, given) = bytes.split_at(bytes.len() - CHECK_BYTES);
    if check(user_id, payload) != given || payload[0] != VERSION {
        return Err(invalid());
    }
    let created_at_us = i64::from_be_bytes(payload[1..9].try_into().map_err(|_| invalid())?);
    let order_id = String::from_utf8(payload[9..].to_vec()).map_err(|_| invalid())?;
    Ok(Some(Cursor {
        created_at_us,
        order_id,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cursor() -> Cursor {
        Cursor {
            created_at_us: 1_700_000_000_000_001,
            order_id: "0191d3c4-0000-7000-8000-000000000000".into(),
        }
    }

    #[test]
    fn a_token_round_trips_for_its_user_only() {
        let token = encode("alice", &cursor());
        assert_eq!(decode("alice", &token).unwrap(), Some(cursor()));
        assert!(matches!(
            decode("bob", &token),
            Err(Error::InvalidField {
                field: "page_token",
                ..
            })
        ));
        assert_eq!(decode("alice", "").unwrap(), None);
    }

    #[test]
    fn every_altered_token_is_invalid_argument() {
        let token = encode("alice", &cursor());
        let mut bytes = URL_SAFE_NO_PAD.decode(&token).unwrap();
        for i in 0..bytes.len() {
            bytes[i] ^= 1;
            let tampered = URL_SAFE_NO_PAD.encode(&bytes);
            assert!(decode("alice", &tampered).is_err(), "byte {i}");
            bytes[i] ^= 1;
        }
        for bad in ["!", "abc", &token[..token.len() - 1], &"A".repeat(600), "%%%%"] {
            assert!(decode("alice", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn page_sizes_follow_aip_158() {
        assert_eq!(page_size(0).unwrap(), 50);
        assert_eq!(page_size(7).unwrap(), 7);
        assert_eq!(page_size(5000).unwrap(), 1000);
        assert!(page_size(-1).is_err());
    }
}
