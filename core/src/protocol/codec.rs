//! Frame encoding: `[version: u8][flags: u8][body length: u32 LE][body]`,
//! the body an rkyv archive, deflated when the `DEFLATE` flag is set, checked
//! with bytecheck before use. The length makes truncation and trailing
//! garbage detectable (an rkyv archive alone cannot tell).
//!
//! Large bodies (catch-up deltas) are deflated with the `flate2` automerge
//! already links, so compression adds no code to the wasm build. The frame
//! limit bounds the inflated body as well as the frame, so a small hostile
//! frame cannot inflate into a large allocation.

use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::DeflateDecoder;
use flate2::write::DeflateEncoder;
use rkyv::rancor;
use rkyv::util::AlignedVec;

use super::message::{Hello, Message};
use super::{
    ErrorCode, MAX_ERROR_TEXT, MAX_HELLO_FRAME, MAX_PRESENCE_LEN, MAX_TOKEN_LEN, PROTOCOL_VERSION,
};
use crate::clock::VersionVector;
use crate::entry::{Entry, Snapshot};
use crate::ids::{DbName, DocId};
use crate::view::DocView;

/// Why a frame was refused. Decoding never panics, whatever the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Zero-length frame.
    #[error("empty frame")]
    Empty,
    /// Shorter or longer than its header says.
    #[error("frame body is {got} bytes, its header says {expected}")]
    Length {
        /// From the header.
        expected: usize,
        /// Actual.
        got: usize,
    },
    /// Larger than the configured limit.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Frame length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A version this build does not speak.
    #[error("protocol version {0} is not supported (this build speaks {PROTOCOL_VERSION})")]
    UnknownVersion(u8),
    /// The archive does not validate.
    #[error("malformed frame: {0}")]
    Malformed(String),
    /// Structurally valid, but a name, id or field breaks a rule.
    #[error("invalid frame: {0}")]
    Invalid(String),
    /// A connection's first frame is compressed ([`decode_hello`]).
    #[error("a connection's first frame (Hello) must not be compressed")]
    CompressedHello,
    /// A connection's first frame is another message ([`decode_hello`]).
    #[error("the first message must be Hello, not {0}")]
    NotHello(&'static str),
}

impl DecodeError {
    /// The error code a receiver reports for this refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::TooLarge,
            DecodeError::UnknownVersion(_) => ErrorCode::UnknownVersion,
            DecodeError::NotHello(_) => ErrorCode::ProtocolViolation,
            DecodeError::Empty
            | DecodeError::Length { .. }
            | DecodeError::Malformed(_)
            | DecodeError::Invalid(_)
            | DecodeError::CompressedHello => ErrorCode::BadFrame,
        }
    }
}

/// Flag: the body is raw deflate.
const DEFLATE: u8 = 1;

/// Bodies at least this long are deflated when that saves an eighth or more.
pub const COMPRESS_MIN: usize = 1024;

/// Encode a message into one frame. A `Hello` is never compressed: a
/// server reads a connection's first frame only if it is a small
/// uncompressed `Hello` ([`decode_hello`]).
pub fn encode(msg: &Message) -> Vec<u8> {
    let body = archive(msg);
    if matches!(msg, Message::Hello(_)) {
        plain_frame(&body)
    } else {
        frame(&body)
    }
}

/// The rkyv archive of a message: a frame's body before compression. With
/// [`frame`], lets a caller drop a large message before compressing it.
pub fn archive(msg: &Message) -> AlignedVec {
    // Serialising owned, in-memory data into a growable buffer cannot fail
    // for our types; fall back to an empty body rather than panic.
    rkyv::to_bytes::<rancor::Error>(msg).unwrap_or_default()
}

/// One frame around an archived body, deflated when it is long enough and
/// that saves an eighth or more. Writes header and body into one buffer
/// (a cold sync's reply is megabytes; each copy would stay with the
/// allocator for a while).
pub fn frame(body: &[u8]) -> Vec<u8> {
    if body.len() >= COMPRESS_MIN {
        let mut out = Vec::with_capacity(body.len() / 3 + HEADER_LEN);
        out.extend_from_slice(&[PROTOCOL_VERSION, DEFLATE, 0, 0, 0, 0]);
        // Level 3: most of level 6's ratio on this data at about half the CPU.
        let mut z = DeflateEncoder::new(out, Compression::new(3));
        if z.write_all(body).is_ok()
            && let Ok(mut out) = z.finish()
        {
            let zlen = out.len() - HEADER_LEN;
            if zlen <= body.len() - body.len() / 8 {
                let len = u32::try_from(zlen).unwrap_or(u32::MAX);
                out[2..HEADER_LEN].copy_from_slice(&len.to_le_bytes());
                return out;
            }
        }
    }
    plain_frame(body)
}

/// One uncompressed frame around an archived body.
fn plain_frame(body: &[u8]) -> Vec<u8> {
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut out = Vec::with_capacity(body.len() + HEADER_LEN);
    out.push(PROTOCOL_VERSION);
    out.push(0);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Size of a message's body before compression, plus the header: the
/// figure the frame limit applies to.
pub fn encoded_len(msg: &Message) -> usize {
    rkyv::to_bytes::<rancor::Error>(msg).map_or(0, |b| b.len()) + HEADER_LEN
}

/// Version byte, flags byte and body length.
pub const HEADER_LEN: usize = 6;

/// Decode and validate one frame of at most `max` bytes.
pub fn decode(frame: &[u8], max: usize) -> Result<Message, DecodeError> {
    if frame.len() > max {
        return Err(DecodeError::TooLarge {
            len: frame.len(),
            max,
        });
    }
    let (&version, body) = frame.split_first().ok_or(DecodeError::Empty)?;
    if version != PROTOCOL_VERSION {
        return Err(DecodeError::UnknownVersion(version));
    }
    let (&flags, body) = body.split_first().ok_or(DecodeError::Length {
        expected: 5,
        got: 0,
    })?;
    if flags & !DEFLATE != 0 {
        return Err(DecodeError::Malformed(format!(
            "unknown frame flags {flags:#04x}"
        )));
    }
    let (len, body) = body.split_at_checked(4).ok_or(DecodeError::Length {
        expected: 4,
        got: body.len(),
    })?;
    let expected = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if expected != body.len() {
        return Err(DecodeError::Length {
            expected,
            got: body.len(),
        });
    }
    // rkyv needs the archive aligned; a received buffer is not.
    let aligned = if flags & DEFLATE != 0 {
        inflate(body, max)?
    } else {
        let mut aligned: AlignedVec<16> = AlignedVec::with_capacity(body.len());
        aligned.extend_from_slice(body);
        aligned
    };
    let mut msg = rkyv::from_bytes::<Message, rancor::Error>(&aligned)
        .map_err(|e| DecodeError::Malformed(e.to_string()))?;
    validate(&mut msg)?;
    Ok(msg)
}

/// Decode a connection's first frame, which must be an uncompressed `Hello`
/// of at most [`MAX_HELLO_FRAME`] bytes. The length and the flags are
/// checked before anything else, so a peer that has not yet presented a
/// token cannot make the receiver inflate, validate or deserialise a large
/// body: an oversized frame is `TooLarge`, a compressed one
/// `CompressedHello`, any other message `NotHello`.
pub fn decode_hello(frame: &[u8]) -> Result<Hello, DecodeError> {
    if frame.len() > MAX_HELLO_FRAME {
        return Err(DecodeError::TooLarge {
            len: frame.len(),
            max: MAX_HELLO_FRAME,
        });
    }
    if frame.len() >= 2 && frame[0] == PROTOCOL_VERSION && frame[1] & DEFLATE != 0 {
        return Err(DecodeError::CompressedHello);
    }
    match decode(frame, MAX_HELLO_FRAME)? {
        Message::Hello(h) => Ok(*h),
        other => Err(DecodeError::NotHello(other.kind())),
    }
}

/// Inflate a deflated body into an aligned buffer of at most `max` bytes.
fn inflate(body: &[u8], max: usize) -> Result<AlignedVec<16>, DecodeError> {
    let mut out: AlignedVec<16> = AlignedVec::with_capacity(body.len().saturating_mul(3).min(max));
    let mut z = DeflateDecoder::new(body);
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = z
            .read(&mut chunk)
            .map_err(|e| DecodeError::Malformed(format!("deflated body: {e}")))?;
        if n == 0 {
            return Ok(out);
        }
        if out.len() + n > max {
            return Err(DecodeError::TooLarge {
                len: out.len() + n,
                max,
            });
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

fn invalid(what: impl Into<String>) -> DecodeError {
    DecodeError::Invalid(what.into())
}

fn check_db(db: &DbName) -> Result<(), DecodeError> {
    if DbName::is_valid(db.as_str()) {
        Ok(())
    } else {
        Err(invalid(format!("database name {:?}", db.as_str())))
    }
}

fn check_doc(doc: &DocId) -> Result<(), DecodeError> {
    if DocId::is_valid(doc.as_str()) {
        Ok(())
    } else {
        Err(invalid(format!("document id {:?}", doc.as_str())))
    }
}

fn check_vv(vv: &mut VersionVector) {
    vv.normalize();
}

fn check_entries(entries: &[Entry]) -> Result<(), DecodeError> {
    for e in entries {
        check_doc(&e.doc)?;
        if e.dot.counter == 0 {
            return Err(invalid("entry counter 0"));
        }
    }
    Ok(())
}

fn check_snapshots(snapshots: &mut [Snapshot]) -> Result<(), DecodeError> {
    for s in snapshots {
        check_doc(&s.doc)?;
        check_vv(&mut s.clock);
    }
    Ok(())
}

/// Views are a cache: one that is not valid is dropped (the receiver then
/// applies that document's entries), not a reason to refuse the frame.
fn check_views(views: &mut Vec<DocView>) {
    views.retain(|v| DocId::is_valid(v.doc.as_str()) && v.is_well_formed());
    for v in views {
        check_vv(&mut v.clock);
    }
}

/// Re-establish the invariants deserialisation bypassed: names and ids
/// follow their rules, vectors are normalised, sizes are within limits.
fn validate(msg: &mut Message) -> Result<(), DecodeError> {
    match msg {
        Message::Hello(h) => {
            if h.token.len() > MAX_TOKEN_LEN {
                return Err(invalid("token too long"));
            }
        }
        Message::Welcome(_)
        | Message::Ping { .. }
        | Message::Pong { .. }
        | Message::ListDatabases { .. } => {}
        Message::Databases(d) => {
            for db in &d.names {
                check_db(db)?;
            }
        }
        Message::Subscribe(s) => {
            check_db(&s.db)?;
            check_vv(&mut s.since);
            if s.req == 0 {
                return Err(invalid("subscribe request number 0"));
            }
        }
        Message::Unsubscribe { db } => check_db(db)?,
        Message::Delta(d) => {
            check_db(&d.db)?;
            check_vv(&mut d.base);
            check_vv(&mut d.vv);
            check_snapshots(&mut d.snapshots)?;
            check_entries(&d.entries)?;
            check_views(&mut d.views);
        }
        Message::Push(p) => {
            check_db(&p.db)?;
            check_entries(&p.entries)?;
        }
        Message::Ack(a) => {
            check_db(&a.db)?;
            check_vv(&mut a.vv);
        }
        Message::Presence(p) => {
            check_db(&p.db)?;
            if p.state.len() > MAX_PRESENCE_LEN {
                return Err(invalid("presence state too large"));
            }
        }
        Message::PresenceUpdate(p) => check_db(&p.db)?,
        Message::Error(e) => {
            if let Some(db) = &e.db {
                check_db(db)?;
            }
            if e.message.len() > MAX_ERROR_TEXT {
                let mut cut = MAX_ERROR_TEXT;
                while !e.message.is_char_boundary(cut) {
                    cut -= 1;
                }
                e.message.truncate(cut);
            }
        }
    }
    Ok(())
}
