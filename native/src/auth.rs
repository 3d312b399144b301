//! Signed access tokens and the server's authenticator.
//!
//! A token is `v1.<payload>.<signature>`: `payload` is base64url (no padding)
//! of JSON `{"db": PATTERN, "rights": "read"|"write"|"admin", "exp": UNIX_SECS?}`
//! and `signature` is base64url of HMAC-SHA256(secret, "v1." + payload).
//! An app backend that knows the secret can mint tokens the same way.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use syncline_core::sync::{AuthError, Authenticator, Grant, Grants, Right};

type HmacSha256 = Hmac<Sha256>;

/// What a token grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Database name pattern (`*` wildcards).
    pub db: String,
    /// `read`, `write` or `admin`.
    pub rights: String,
    /// Expiry, seconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn mac(secret: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so this cannot fail.
    <HmacSha256 as KeyInit>::new_from_slice(secret).unwrap_or_else(|_| {
        <HmacSha256 as KeyInit>::new_from_slice(&[0]).expect("one-byte HMAC key")
    })
}

/// Mint a token.
pub fn mint(secret: &[u8], claims: &Claims) -> String {
    let payload = B64.encode(serde_json::to_vec(claims).unwrap_or_default());
    let mut m = mac(secret);
    m.update(b"v1.");
    m.update(payload.as_bytes());
    let sig = B64.encode(m.finalize().into_bytes());
    format!("v1.{payload}.{sig}")
}

/// Verify a token's signature and expiry.
pub fn verify(secret: &[u8], token: &str) -> Result<Claims, AuthError> {
    let mut parts = token.split('.');
    let (Some("v1"), Some(payload), Some(sig), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Invalid("malformed token".into()));
    };
    let sig = B64
        .decode(sig)
        .map_err(|_| AuthError::Invalid("malformed signature".into()))?;
    let mut m = mac(secret);
    m.update(b"v1.");
    m.update(payload.as_bytes());
    m.verify_slice(&sig)
        .map_err(|_| AuthError::Invalid("bad signature".into()))?;
    let json = B64
        .decode(payload)
        .map_err(|_| AuthError::Invalid("malformed payload".into()))?;
    let claims: Claims = serde_json::from_slice(&json)
        .map_err(|e| AuthError::Invalid(format!("malformed claims: {e}")))?;
    if Right::parse(&claims.rights).is_none() {
        return Err(AuthError::Invalid(format!(
            "unknown rights {:?}",
            claims.rights
        )));
    }
    if claims.exp.is_some_and(|exp| exp <= now_secs()) {
        return Err(AuthError::Expired);
    }
    Ok(claims)
}

/// The server's authenticator: signed tokens, plus anonymous write access to
/// the database patterns the operator opted in.
#[derive(Clone)]
pub struct TokenAuth {
    secret: Vec<u8>,
    anonymous: Vec<String>,
}

impl std::fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuth")
            .field("anonymous", &self.anonymous)
            .finish_non_exhaustive()
    }
}

impl TokenAuth {
    /// Verify with `secret`; allow anonymous read/write on `anonymous` patterns.
    pub fn new(secret: Vec<u8>, anonymous: Vec<String>) -> Self {
        TokenAuth { secret, anonymous }
    }
}

impl Authenticator for TokenAuth {
    fn authenticate(&self, token: &str) -> Result<Grants, AuthError> {
        let mut grants = Grants::none();
        for p in &self.anonymous {
            grants.push(Grant {
                pattern: p.clone(),
                right: Right::Write,
            });
        }
        if token.is_empty() {
            return if self.anonymous.is_empty() {
                Err(AuthError::Missing)
            } else {
                Ok(grants)
            };
        }
        let claims = verify(&self.secret, token)?;
        let right = Right::parse(&claims.rights).unwrap_or(Right::Read);
        grants.push(Grant {
            pattern: claims.db,
            right,
        });
        // The whole connection ends with the token (anonymous rights too:
        // a client reconnects, anonymously or with a fresh token).
        Ok(grants.until(claims.exp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(rights: &str, exp: Option<u64>) -> Claims {
        Claims {
            db: "org-*".into(),
            rights: rights.into(),
            exp,
        }
    }

    #[test]
    fn tokens_verify_and_refuse() {
        let t = mint(b"s3cret", &claims("write", None));
        assert_eq!(verify(b"s3cret", &t).unwrap(), claims("write", None));
        assert!(matches!(verify(b"other", &t), Err(AuthError::Invalid(_))));
        let expired = mint(b"s3cret", &claims("read", Some(1)));
        assert_eq!(verify(b"s3cret", &expired), Err(AuthError::Expired));
        let mut tampered = t.clone();
        tampered.insert(5, 'x');
        assert!(verify(b"s3cret", &tampered).is_err());
        for junk in ["", "v1", "v1..", "v2.a.b", "v1.a.b.c", "v1.!!.??"] {
            assert!(verify(b"s3cret", junk).is_err(), "{junk}");
        }
        let bad_rights = mint(b"s3cret", &claims("root", None));
        assert!(verify(b"s3cret", &bad_rights).is_err());
    }

    #[test]
    fn anonymous_access_is_opt_in() {
        let closed = TokenAuth::new(b"k".to_vec(), vec![]);
        assert_eq!(closed.authenticate(""), Err(AuthError::Missing));
        let open = TokenAuth::new(b"k".to_vec(), vec!["demo-*".into()]);
        let g = open.authenticate("").unwrap();
        assert!(g.allows("demo-todo", Right::Write));
        assert!(!g.allows("prod", Right::Read));
        let t = mint(b"k", &claims("read", None));
        let g = open.authenticate(&t).unwrap();
        assert!(g.allows("org-1", Right::Read) && !g.allows("org-1", Right::Write));
    }
}
