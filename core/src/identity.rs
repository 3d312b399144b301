//! Replica identity: a replica id is derived from an Ed25519 public key, and
//! a connection's `Hello` proves that the client holds the matching secret.
//!
//! Every reader sees other replicas' ids (in deltas and presence), so an id
//! alone proves nothing: a client that could claim any id could push under a
//! victim's next counters, forging its history and making the victim's own
//! offline edits look acknowledged. Instead:
//!
//! - a replica's id is the first 16 bytes of `SHA-256("syncline-replica-v1" ‖
//!   public key)` ([`replica_of_key`]), so no one can choose a key for an id;
//! - `Hello` carries a [`Proof`]: the public key and a signature over the
//!   server's name (the host the client dialled), the client's clock and a
//!   fresh nonce. It rides in the first frame, so it costs no round trip;
//! - the server checks the signature, that the host is one of its names,
//!   that the clock is within its skew window, and keeps the nonces it has
//!   accepted in that window ([`ReplayWindow`]), so a captured `Hello`
//!   cannot be replayed.
//!
//! Signing needs the secret, which lives with the client: a key file in the
//! native client's data directory ([`Identity`]), a non-extractable WebCrypto
//! key in the browser. Verifying is all the server does.

use std::collections::BTreeSet;

use ed25519_dalek::{Signature, SigningKey, VerifyingKey};
use rkyv::{Archive, Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::ReplicaId;

/// Longest host name a proof may carry (DNS names are at most 253 bytes,
/// plus a port).
pub const MAX_HOST_LEN: usize = 262;

/// Default skew allowed between a client's clock and the server's, each
/// way, in milliseconds (10 minutes).
pub const DEFAULT_CLOCK_SKEW_MS: u64 = 10 * 60 * 1000;

/// Default number of nonces a server remembers (about 12 MiB at most).
pub const DEFAULT_REPLAY_CAPACITY: usize = 256 * 1024;

const REPLICA_DOMAIN: &[u8] = b"syncline-replica-v1";
const HELLO_DOMAIN: &[u8] = b"syncline-hello-v1";

/// The replica id of a public key.
pub fn replica_of_key(key: &[u8; 32]) -> ReplicaId {
    let mut h = Sha256::new();
    h.update(REPLICA_DOMAIN);
    h.update(key);
    let digest = h.finalize();
    let mut id = [0u8; 16];
    id.copy_from_slice(&digest[..16]);
    ReplicaId(id)
}

/// The bytes a proof signs. Every field has a fixed length or a length
/// prefix, so no two field sets share a message.
pub fn signed_message(key: &[u8; 32], host: &str, time_ms: u64, nonce: &[u8; 16]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HELLO_DOMAIN.len() + 32 + 2 + host.len() + 8 + 16);
    m.extend_from_slice(HELLO_DOMAIN);
    m.extend_from_slice(key);
    // Hosts longer than MAX_HOST_LEN are refused before this is built.
    m.extend_from_slice(&(host.len().min(u16::MAX as usize) as u16).to_le_bytes());
    m.extend_from_slice(host.as_bytes());
    m.extend_from_slice(&time_ms.to_le_bytes());
    m.extend_from_slice(nonce);
    m
}

/// The host part of a URL's authority as a browser sends it in `Host`:
/// lowercase, with the scheme's default port dropped. Servers compare this
/// form.
pub fn normalize_host(host: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    for default in [":80", ":443"] {
        if let Some(h) = host.strip_suffix(default) {
            return h.to_string();
        }
    }
    host
}

/// The host (and port, unless it is the scheme's default) of a `ws://` or
/// `wss://` URL, normalised: what a client signs.
pub fn host_of_url(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .or_else(|| url.strip_prefix("http://"))
        .or_else(|| url.strip_prefix("https://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    // Drop credentials, if any.
    let authority = authority.rsplit('@').next()?;
    (!authority.is_empty()).then(|| normalize_host(authority))
}

/// Proof, sent in `Hello`, that the client holds the secret key of its
/// replica id.
#[derive(Debug, Clone, PartialEq, Eq, Archive, Serialize, Deserialize)]
pub struct Proof {
    /// The Ed25519 public key; the replica id is derived from it.
    pub key: [u8; 32],
    /// The server name the client dialled (see [`host_of_url`]).
    pub host: String,
    /// The client's clock, Unix milliseconds.
    pub time_ms: u64,
    /// Fresh random bytes: a second `Hello` with the same ones is a replay.
    pub nonce: [u8; 16],
    /// Ed25519 signature over [`signed_message`].
    pub sig: [u8; 64],
}

/// Why a proof was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    /// The replica id is not the one derived from the key.
    #[error(
        "the replica id is not derived from the key in Hello: a client may only write as its own replica"
    )]
    NotOwnReplica,
    /// The key is not a valid Ed25519 public key.
    #[error("the key in Hello is not a valid Ed25519 public key")]
    BadKey,
    /// The signature does not verify.
    #[error("the signature in Hello does not verify")]
    BadSignature,
    /// The host is not one of this server's names.
    #[error("Hello was signed for host {0:?}, which is not this server")]
    WrongHost(String),
    /// The host is longer than [`MAX_HOST_LEN`].
    #[error("the host in Hello is longer than {MAX_HOST_LEN} bytes")]
    HostTooLong,
    /// The client's clock is outside the server's window.
    #[error(
        "Hello is dated {off_s} s from the server's clock (at most {max_s} s allowed): check the client's clock"
    )]
    ClockSkew {
        /// Seconds between the two clocks (signed: negative if the client is behind).
        off_s: i64,
        /// The window each way, in seconds.
        max_s: u64,
    },
    /// This exact `Hello` was accepted before.
    #[error(
        "this Hello was used before (a replay); a client signs a fresh one for every connection"
    )]
    Replayed,
}

impl Proof {
    /// Check the signature and that `replica` is the key's.
    pub fn verify(&self, replica: ReplicaId) -> Result<(), ProofError> {
        if self.host.len() > MAX_HOST_LEN {
            return Err(ProofError::HostTooLong);
        }
        if replica_of_key(&self.key) != replica {
            return Err(ProofError::NotOwnReplica);
        }
        let key = VerifyingKey::from_bytes(&self.key).map_err(|_| ProofError::BadKey)?;
        let msg = signed_message(&self.key, &self.host, self.time_ms, &self.nonce);
        // `verify_strict` also refuses weak keys and non-canonical
        // signatures, so one secret has exactly one valid proof per message.
        key.verify_strict(&msg, &Signature::from_bytes(&self.sig))
            .map_err(|_| ProofError::BadSignature)
    }
}

/// A replica's secret key, where the client can hold one in memory (the
/// native client; the browser keeps a non-extractable WebCrypto key instead).
#[derive(Clone)]
pub struct Identity {
    key: SigningKey,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("Identity")
            .field("replica", &self.replica())
            .finish()
    }
}

impl Identity {
    /// A fresh identity from the system's random source.
    pub fn generate() -> Self {
        let mut seed = [0u8; 32];
        seed[..16].copy_from_slice(&random16());
        seed[16..].copy_from_slice(&random16());
        Identity::from_seed(seed)
    }

    /// The identity of a 32-byte secret seed (as kept in a key file).
    pub fn from_seed(seed: [u8; 32]) -> Self {
        Identity {
            key: SigningKey::from_bytes(&seed),
        }
    }

    /// The secret seed, to be kept where only its owner can read it.
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// The replica id this identity owns.
    pub fn replica(&self) -> ReplicaId {
        replica_of_key(&self.public_key())
    }

    /// A proof for one connection to `host` at `time_ms`, with a fresh nonce.
    pub fn prove(&self, host: &str, time_ms: u64) -> Proof {
        self.prove_with_nonce(host, time_ms, random16())
    }

    /// A proof with a given nonce (deterministic simulations).
    pub fn prove_with_nonce(&self, host: &str, time_ms: u64, nonce: [u8; 16]) -> Proof {
        use ed25519_dalek::Signer;
        let key = self.public_key();
        let sig = self
            .key
            .sign(&signed_message(&key, host, time_ms, &nonce))
            .to_bytes();
        Proof {
            key,
            host: host.to_string(),
            time_ms,
            nonce,
            sig,
        }
    }
}

/// 16 random bytes (automerge's random actor id, so no extra RNG dependency).
fn random16() -> [u8; 16] {
    ReplicaId::random().0
}

/// The nonces a server accepted recently, so that a `Hello` is accepted once.
///
/// A proof is accepted only if its time is within the skew window of the
/// server's clock and newer than the window's floor. The floor is the
/// oldest time still remembered when the set is full: the oldest nonce is
/// forgotten and the floor rises past it, so a forgotten `Hello` is refused
/// as too old rather than accepted again. Memory stays at `capacity`
/// entries whatever the handshake rate; under a flood, only clients whose
/// clocks lag furthest behind are refused (with a clock error).
#[derive(Debug)]
pub struct ReplayWindow {
    seen: BTreeSet<(u64, [u8; 16])>,
    floor: u64,
    skew_ms: u64,
    capacity: usize,
}

impl ReplayWindow {
    /// A window of `skew_ms` each way, remembering at most `capacity` nonces.
    pub fn new(skew_ms: u64, capacity: usize) -> Self {
        ReplayWindow {
            seen: BTreeSet::new(),
            floor: 0,
            skew_ms,
            capacity: capacity.max(1),
        }
    }

    /// Accept `proof` at server time `now_ms` (remembering its nonce), or
    /// say why not.
    pub fn admit(&mut self, proof: &Proof, now_ms: u64) -> Result<(), ProofError> {
        let skew = |t: u64| {
            let off = (t as i128 - now_ms as i128) / 1000;
            ProofError::ClockSkew {
                off_s: off.clamp(i64::MIN as i128, i64::MAX as i128) as i64,
                max_s: self.skew_ms / 1000,
            }
        };
        // Nothing older than the window needs remembering any more.
        let oldest = now_ms.saturating_sub(self.skew_ms);
        if self.floor < oldest {
            self.floor = oldest;
            self.seen = self.seen.split_off(&(oldest, [0; 16]));
        }
        let t = proof.time_ms;
        if t > now_ms.saturating_add(self.skew_ms) || t < self.floor {
            return Err(skew(t));
        }
        if !self.seen.insert((t, proof.nonce)) {
            return Err(ProofError::Replayed);
        }
        while self.seen.len() > self.capacity {
            if let Some((t0, _)) = self.seen.pop_first() {
                // Everything at t0 or before is now refused as too old.
                self.floor = self.floor.max(t0.saturating_add(1));
            }
        }
        Ok(())
    }

    /// Nonces remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether no nonce is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_verifies_for_its_own_replica_only() {
        let me = Identity::from_seed([7; 32]);
        let p = me.prove("example.com", 1_000);
        assert_eq!(p.verify(me.replica()), Ok(()));
        let other = Identity::from_seed([8; 32]);
        assert_eq!(p.verify(other.replica()), Err(ProofError::NotOwnReplica));
    }

    #[test]
    fn any_changed_field_breaks_the_signature() {
        let me = Identity::from_seed([7; 32]);
        let p = me.prove("example.com", 1_000);
        let mut q = p.clone();
        q.host = "evil.com".into();
        assert_eq!(q.verify(me.replica()), Err(ProofError::BadSignature));
        let mut q = p.clone();
        q.time_ms += 1;
        assert_eq!(q.verify(me.replica()), Err(ProofError::BadSignature));
        let mut q = p.clone();
        q.nonce[0] ^= 1;
        assert_eq!(q.verify(me.replica()), Err(ProofError::BadSignature));
        let mut q = p;
        q.sig[5] ^= 1;
        assert_eq!(q.verify(me.replica()), Err(ProofError::BadSignature));
    }

    #[test]
    fn another_key_cannot_sign_for_a_replica() {
        let victim = Identity::from_seed([1; 32]);
        let attacker = Identity::from_seed([2; 32]);
        // The victim's public key with the attacker's signature.
        let mut p = attacker.prove("h", 0);
        p.key = victim.public_key();
        assert_eq!(p.verify(victim.replica()), Err(ProofError::BadSignature));
    }

    #[test]
    fn a_nonce_is_accepted_once_and_clocks_must_agree() {
        let me = Identity::from_seed([7; 32]);
        let mut w = ReplayWindow::new(60_000, 100);
        let now = 10_000_000;
        let p = me.prove("h", now);
        assert_eq!(w.admit(&p, now), Ok(()));
        assert_eq!(w.admit(&p, now + 5), Err(ProofError::Replayed));
        let late = me.prove("h", now - 61_000);
        assert!(matches!(
            w.admit(&late, now),
            Err(ProofError::ClockSkew { off_s: -61, .. })
        ));
        let early = me.prove("h", now + 61_000);
        assert!(matches!(
            w.admit(&early, now),
            Err(ProofError::ClockSkew { off_s: 61, .. })
        ));
        // Once the window has passed, the old nonce is forgotten but its
        // Hello is refused as too old.
        assert!(matches!(
            w.admit(&p, now + 61_000),
            Err(ProofError::ClockSkew { .. })
        ));
        assert!(w.is_empty());
    }

    #[test]
    fn a_full_window_forgets_the_oldest_and_refuses_it_as_too_old() {
        let me = Identity::from_seed([7; 32]);
        let mut w = ReplayWindow::new(60_000, 3);
        let now = 10_000_000;
        let proofs: Vec<Proof> = (0..4).map(|i| me.prove("h", now + i)).collect();
        for p in &proofs {
            assert_eq!(w.admit(p, now), Ok(()));
        }
        assert_eq!(w.len(), 3);
        // The first was forgotten: its replay is refused all the same.
        assert!(matches!(
            w.admit(&proofs[0], now),
            Err(ProofError::ClockSkew { .. })
        ));
        for p in &proofs[1..] {
            assert_eq!(w.admit(p, now), Err(ProofError::Replayed));
        }
    }

    #[test]
    fn hosts_are_compared_as_browsers_send_them() {
        assert_eq!(
            host_of_url("wss://Sync.Example.com/sync").as_deref(),
            Some("sync.example.com")
        );
        assert_eq!(
            host_of_url("ws://127.0.0.1:8080/sync?x=1").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(
            host_of_url("wss://a.example:443/sync").as_deref(),
            Some("a.example")
        );
        assert_eq!(host_of_url("ftp://x").as_deref(), None);
        assert_eq!(normalize_host("Example.com:80"), "example.com");
    }
}
