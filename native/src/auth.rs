//! Access tokens (JWTs, RFC 7519) and the server's authenticator.
//!
//! A token is a JWT signed with HS256 under the server's secret, or with
//! EdDSA, ES256 or RS256 under a key of the operator's JWKS file (its `kid`
//! header picks the key, so keys rotate by adding the new one to the file
//! before tokens use it). Claims:
//!
//! ```json
//! {"sub": "user-7", "exp": 1767225600, "nbf": 1767139200, "iat": 1767139200,
//!  "grants": [{"db": "org-42-*", "rights": "read"}, {"db": "user-7", "rights": "write"}]}
//! ```
//!
//! `grants` lists database patterns (`*` wildcards) with `read`, `write` or
//! `admin`; one token covers every database a user may open. `exp`, `nbf`
//! and `iat` are Unix seconds (`exp` and `nbf` are checked with 60 s of
//! leeway; a token without `exp` never expires). The grants may sit under
//! another claim name (`--grants-claim`, for identity providers that want
//! namespaced claims), and `iss`/`aud` are checked when configured.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use syncline_core::sync::{AuthError, Authenticator, Grant, Grants, Right};

/// Shortest secret accepted for HS256 (RFC 7518 §3.2: at least the hash size).
pub const MIN_SECRET_LEN: usize = 32;

/// Largest JWKS file read.
const MAX_JWKS_BYTES: u64 = 1 << 20;

/// How often the JWKS file's modification time is looked at.
const JWKS_RECHECK: Duration = Duration::from_secs(1);

/// Leeway for `exp` and `nbf` (clocks of issuers and servers differ).
const LEEWAY_SECS: u64 = 60;

/// One grant as a token carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantClaim {
    /// Database name pattern (`*` wildcards).
    pub db: String,
    /// `read`, `write` or `admin`.
    pub rights: String,
}

/// The claims `syncline token` mints.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Who the token is for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub: Option<String>,
    /// Expiry, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exp: Option<u64>,
    /// Issued at, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    /// What it grants.
    pub grants: Vec<GrantClaim>,
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Mint an HS256 token.
pub fn mint(secret: &[u8], claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret)?,
    )
}

/// How tokens are checked (`syncline serve` options).
#[derive(Debug, Clone, Default)]
pub struct TokenConfig {
    /// HS256 secret (at least [`MIN_SECRET_LEN`] bytes).
    pub secret: Vec<u8>,
    /// Database patterns anyone may read and write without a token.
    pub anonymous: Vec<String>,
    /// A JWKS file of public keys for EdDSA, ES256 and RS256 tokens.
    pub jwks_file: Option<PathBuf>,
    /// The claim holding the grants (default `grants`).
    pub grants_claim: Option<String>,
    /// Required `iss`, if any.
    pub issuer: Option<String>,
    /// Required `aud` (one of), if any.
    pub audience: Option<String>,
}

/// A key of the JWKS file.
struct Key {
    alg: Algorithm,
    key: Arc<DecodingKey>,
}

/// The JWKS file's keys by `kid`, reloaded when the file changes.
struct Jwks {
    path: PathBuf,
    keys: HashMap<String, Arc<Key>>,
    modified: Option<SystemTime>,
    checked: Instant,
    /// Why the last load failed (kept, so the old keys stay in use).
    error: Option<String>,
}

impl Jwks {
    fn load(path: &Path) -> Result<HashMap<String, Arc<Key>>, String> {
        let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
        if meta.len() > MAX_JWKS_BYTES {
            return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
        }
        let text = std::fs::read(path).map_err(|e| e.to_string())?;
        let set: JwkSet = serde_json::from_slice(&text).map_err(|e| e.to_string())?;
        let mut keys = HashMap::new();
        for jwk in &set.keys {
            let kid = jwk
                .common
                .key_id
                .clone()
                .ok_or("every key needs a \"kid\"")?;
            let alg = match &jwk.algorithm {
                jsonwebtoken::jwk::AlgorithmParameters::OctetKeyPair(_) => Algorithm::EdDSA,
                jsonwebtoken::jwk::AlgorithmParameters::EllipticCurve(_) => Algorithm::ES256,
                jsonwebtoken::jwk::AlgorithmParameters::RSA(_) => Algorithm::RS256,
                _ => {
                    return Err(format!(
                        "key {kid:?} is not an Ed25519, P-256 or RSA public key (shared secrets go in --secret)"
                    ));
                }
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("key {kid:?}: {e}"))?;
            keys.insert(
                kid,
                Arc::new(Key {
                    alg,
                    key: Arc::new(key),
                }),
            );
        }
        Ok(keys)
    }

    /// Reload when the file's modification time moved (at most once per
    /// [`JWKS_RECHECK`]); a file that no longer loads keeps the old keys.
    fn refresh(&mut self) {
        if self.checked.elapsed() < JWKS_RECHECK {
            return;
        }
        self.checked = Instant::now();
        let modified = std::fs::metadata(&self.path)
            .and_then(|m| m.modified())
            .ok();
        if modified == self.modified {
            return;
        }
        self.modified = modified;
        match Self::load(&self.path) {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), path = %self.path.display(), "loaded the JWKS file");
                self.keys = keys;
                self.error = None;
            }
            Err(e) => {
                tracing::error!(path = %self.path.display(), "the JWKS file does not load, keeping its previous keys: {e}");
                self.error = Some(e);
            }
        }
    }
}

/// The server's authenticator: JWTs, plus anonymous write access to the
/// database patterns the operator opted in.
#[derive(Clone)]
pub struct TokenAuth {
    hs256: Option<Arc<DecodingKey>>,
    jwks: Option<Arc<Mutex<Jwks>>>,
    anonymous: Vec<String>,
    grants_claim: String,
    issuer: Option<String>,
    audience: Option<String>,
}

impl std::fmt::Debug for TokenAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenAuth")
            .field("anonymous", &self.anonymous)
            .field("grants_claim", &self.grants_claim)
            .finish_non_exhaustive()
    }
}

impl TokenAuth {
    /// From the operator's settings. Fails on a secret shorter than
    /// [`MIN_SECRET_LEN`] or a JWKS file that does not load.
    pub fn new(config: TokenConfig) -> Result<Self, String> {
        let hs256 = if config.secret.is_empty() {
            None
        } else if config.secret.len() < MIN_SECRET_LEN {
            return Err(format!(
                "the token secret must be at least {MIN_SECRET_LEN} bytes, not {}",
                config.secret.len()
            ));
        } else {
            let key = DecodingKey::from_secret(&config.secret).map_err(|e| e.to_string())?;
            Some(Arc::new(key))
        };
        let jwks = match config.jwks_file {
            None => None,
            Some(path) => {
                let keys = Jwks::load(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
                Some(Arc::new(Mutex::new(Jwks {
                    path,
                    keys,
                    modified,
                    checked: Instant::now(),
                    error: None,
                })))
            }
        };
        Ok(TokenAuth {
            hs256,
            jwks,
            anonymous: config.anonymous,
            grants_claim: config.grants_claim.unwrap_or_else(|| "grants".into()),
            issuer: config.issuer,
            audience: config.audience,
        })
    }

    /// The key and algorithm for a token's header.
    fn key_for(&self, header: &Header) -> Result<(Algorithm, Arc<DecodingKey>), AuthError> {
        match header.alg {
            Algorithm::HS256 => match &self.hs256 {
                Some(k) => Ok((Algorithm::HS256, k.clone())),
                None => Err(AuthError::Invalid(
                    "HS256 tokens are not accepted here".into(),
                )),
            },
            Algorithm::EdDSA | Algorithm::ES256 | Algorithm::RS256 => {
                let Some(jwks) = &self.jwks else {
                    return Err(AuthError::Invalid(format!(
                        "{:?} tokens need a JWKS file on the server (--jwks-file)",
                        header.alg
                    )));
                };
                let mut jwks = jwks.lock().unwrap_or_else(|p| p.into_inner());
                jwks.refresh();
                let Some(kid) = &header.kid else {
                    return Err(AuthError::Invalid("the token has no \"kid\" header".into()));
                };
                let Some(key) = jwks.keys.get(kid).cloned() else {
                    return Err(AuthError::Invalid(format!("unknown key id {kid:?}")));
                };
                if key.alg != header.alg {
                    return Err(AuthError::Invalid(format!(
                        "key {kid:?} is for {:?}, not {:?}",
                        key.alg, header.alg
                    )));
                }
                Ok((key.alg, key.key.clone()))
            }
            other => Err(AuthError::Invalid(format!(
                "algorithm {other:?} is not accepted (HS256, EdDSA, ES256, RS256)"
            ))),
        }
    }

    /// Verify a token and read its grants.
    pub fn verify(&self, token: &str) -> Result<Grants, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed token (expected a JWT)".into()))?;
        let (alg, key) = self.key_for(&header)?;
        let mut v = Validation::new(alg);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        // A token without exp never expires (minted with `--expires never`).
        v.required_spec_claims.clear();
        if let Some(iss) = &self.issuer {
            v.set_issuer(&[iss]);
            v.required_spec_claims.insert("iss".into());
        }
        match &self.audience {
            Some(aud) => {
                v.set_audience(&[aud]);
                v.required_spec_claims.insert("aud".into());
            }
            None => v.validate_aud = false,
        }
        let data =
            jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(token, &key, &v)
                .map_err(|e| {
                    use jsonwebtoken::errors::ErrorKind;
                    match e.kind() {
                        ErrorKind::ExpiredSignature => AuthError::Expired,
                        ErrorKind::ImmatureSignature => {
                            AuthError::Invalid("the token is not valid yet (nbf)".into())
                        }
                        ErrorKind::InvalidSignature => {
                            AuthError::Invalid("the signature does not verify".into())
                        }
                        ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer (iss)".into()),
                        ErrorKind::InvalidAudience => {
                            AuthError::Invalid("wrong audience (aud)".into())
                        }
                        ErrorKind::MissingRequiredClaim(c) => {
                            AuthError::Invalid(format!("the token has no {c:?} claim"))
                        }
                        _ => AuthError::Invalid(format!("malformed token: {e}")),
                    }
                })?;
        let claims = data.claims;
        let grants: Vec<GrantClaim> = match claims.get(&self.grants_claim) {
            Some(g) => serde_json::from_value(g.clone()).map_err(|e| {
                AuthError::Invalid(format!("malformed {:?} claim: {e}", self.grants_claim))
            })?,
            None => {
                return Err(AuthError::Invalid(format!(
                    "the token has no {:?} claim",
                    self.grants_claim
                )));
            }
        };
        let mut out = Grants::none();
        for g in grants {
            let right = Right::parse(&g.rights)
                .ok_or_else(|| AuthError::Invalid(format!("unknown rights {:?}", g.rights)))?;
            out.push(Grant {
                pattern: g.db,
                right,
            });
        }
        let exp = claims.get("exp").and_then(serde_json::Value::as_u64);
        let sub = claims
            .get("sub")
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned);
        Ok(out.until(exp).for_subject(sub))
    }
}

impl Authenticator for TokenAuth {
    fn authenticate(&self, token: &str) -> Result<Grants, AuthError> {
        let anonymous = || {
            self.anonymous.iter().map(|p| Grant {
                pattern: p.clone(),
                right: Right::Write,
            })
        };
        if token.is_empty() {
            return if self.anonymous.is_empty() {
                Err(AuthError::Missing)
            } else {
                let mut g = Grants::none();
                anonymous().for_each(|a| g.push(a));
                Ok(g)
            };
        }
        let mut grants = self.verify(token)?;
        // The whole connection ends with the token (anonymous rights too:
        // a client reconnects, anonymously or with a fresh token).
        anonymous().for_each(|a| grants.push(a));
        Ok(grants)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    fn auth(anonymous: &[&str]) -> TokenAuth {
        TokenAuth::new(TokenConfig {
            secret: SECRET.to_vec(),
            anonymous: anonymous.iter().map(|s| s.to_string()).collect(),
            ..TokenConfig::default()
        })
        .unwrap()
    }

    fn claims(grants: &[(&str, &str)], exp: Option<u64>) -> Claims {
        Claims {
            sub: Some("user-7".into()),
            exp,
            iat: Some(now_secs()),
            grants: grants
                .iter()
                .map(|(db, r)| GrantClaim {
                    db: db.to_string(),
                    rights: r.to_string(),
                })
                .collect(),
        }
    }

    #[test]
    fn tokens_verify_and_refuse() {
        let a = auth(&[]);
        let t = mint(
            SECRET,
            &claims(&[("org-*", "read"), ("user-7", "write")], None),
        )
        .unwrap();
        let g = a.authenticate(&t).unwrap();
        assert!(g.allows("org-1", Right::Read) && !g.allows("org-1", Right::Write));
        assert!(g.allows("user-7", Right::Write));
        assert_eq!(g.subject(), Some("user-7"));
        let other = mint(
            b"another-secret-of-32-bytes-long!",
            &claims(&[("*", "admin")], None),
        )
        .unwrap();
        assert!(
            matches!(a.authenticate(&other), Err(AuthError::Invalid(m)) if m.contains("signature"))
        );
        let expired = mint(SECRET, &claims(&[("x", "read")], Some(1))).unwrap();
        assert_eq!(a.authenticate(&expired), Err(AuthError::Expired));
        let bad_rights = mint(SECRET, &claims(&[("x", "root")], None)).unwrap();
        assert!(a.authenticate(&bad_rights).is_err());
        for junk in ["x", "v1.a.b", "a.b.c", "..", "eyJhbGciOiJub25lIn0.e30."] {
            assert!(a.authenticate(junk).is_err(), "{junk}");
        }
    }

    #[test]
    fn issuer_audience_and_the_grants_claim_are_configurable() {
        let idp = TokenAuth::new(TokenConfig {
            secret: SECRET.to_vec(),
            grants_claim: Some("https://example.com/syncline".into()),
            issuer: Some("https://idp.example.com/".into()),
            audience: Some("syncline".into()),
            ..TokenConfig::default()
        })
        .unwrap();
        let token = |claims: serde_json::Value| {
            jsonwebtoken::encode(
                &Header::new(Algorithm::HS256),
                &claims,
                &EncodingKey::from_secret(SECRET).unwrap(),
            )
            .unwrap()
        };
        let grants = serde_json::json!([{"db": "org-*", "rights": "write"}]);
        let good = token(serde_json::json!({
            "sub": "auth0|42", "iss": "https://idp.example.com/", "aud": "syncline",
            "https://example.com/syncline": grants,
        }));
        let g = idp.authenticate(&good).unwrap();
        assert!(g.allows("org-1", Right::Write));
        assert_eq!(g.subject(), Some("auth0|42"));
        let wrong_iss = token(serde_json::json!({
            "iss": "https://evil.example/", "aud": "syncline", "https://example.com/syncline": grants,
        }));
        assert!(
            matches!(idp.authenticate(&wrong_iss), Err(AuthError::Invalid(m)) if m.contains("issuer"))
        );
        let wrong_aud = token(serde_json::json!({
            "iss": "https://idp.example.com/", "aud": "other", "https://example.com/syncline": grants,
        }));
        assert!(
            matches!(idp.authenticate(&wrong_aud), Err(AuthError::Invalid(m)) if m.contains("audience"))
        );
        let no_grants = token(serde_json::json!({
            "iss": "https://idp.example.com/", "aud": "syncline", "grants": grants,
        }));
        assert!(
            matches!(idp.authenticate(&no_grants), Err(AuthError::Invalid(m)) if m.contains("https://example.com/syncline"))
        );
    }

    #[test]
    fn short_secrets_are_refused() {
        let e = TokenAuth::new(TokenConfig {
            secret: b"short".to_vec(),
            ..TokenConfig::default()
        });
        assert!(e.unwrap_err().contains("at least 32 bytes"));
    }

    #[test]
    fn anonymous_access_is_opt_in() {
        let closed = auth(&[]);
        assert_eq!(closed.authenticate(""), Err(AuthError::Missing));
        let open = auth(&["demo-*"]);
        let g = open.authenticate("").unwrap();
        assert!(g.allows("demo-todo", Right::Write));
        assert!(!g.allows("prod", Right::Read));
        let t = mint(SECRET, &claims(&[("org-*", "read")], None)).unwrap();
        let g = open.authenticate(&t).unwrap();
        assert!(g.allows("org-1", Right::Read) && !g.allows("org-1", Right::Write));
    }
}
