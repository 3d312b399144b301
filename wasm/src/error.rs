//! Errors as JS sees them: an `Error` whose `code` property is a stable
//! string a program can switch on (`err.code === 'QuotaExceeded'`), and whose
//! `message` is for people.

use syncline_core::IdError;
use syncline_core::protocol::ErrorCode;
use syncline_core::sync::ClientError as CoreClientError;
use wasm_bindgen::JsValue;

use crate::store::StoreError;

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// A database name or document id does not follow the rules.
    #[error(transparent)]
    InvalidId(#[from] IdError),
    /// The database was not opened on this client.
    #[error("database {0} is not open: call open() first")]
    NotOpen(String),
    /// The value cannot become a document (not an object, reserved key, bad path…).
    #[error("{0}")]
    InvalidValue(String),
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The server refused.
    #[error("server refused ({code:?}): {message}")]
    Server {
        /// Its code.
        code: ErrorCode,
        /// Its text.
        message: String,
    },
    /// A value over a protocol limit.
    #[error("{0}")]
    TooLarge(String),
    /// The server URL is unusable.
    #[error("{0}")]
    InvalidUrl(String),
    /// A local-only client (no server URL) is never synced.
    #[error("this client has no server: it is a local replica and never syncs")]
    NoServer,
    /// The client was closed.
    #[error("the client is closed")]
    Closed,
    /// The runtime lacks something the client needs (WebCrypto Ed25519).
    #[error("{0}")]
    Unsupported(String),
}

impl From<CoreClientError> for WasmError {
    fn from(e: CoreClientError) -> Self {
        match e {
            CoreClientError::NotOpen(db) => WasmError::NotOpen(db.as_str().to_owned()),
            CoreClientError::Doc(d) => WasmError::InvalidValue(d.to_string()),
            e @ CoreClientError::PresenceTooLarge { .. } => WasmError::TooLarge(e.to_string()),
        }
    }
}

impl WasmError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        match self {
            WasmError::InvalidId(IdError::DbName(_)) => "InvalidDatabaseName",
            WasmError::InvalidId(_) => "InvalidDocumentId",
            WasmError::NotOpen(_) => "NotOpen",
            WasmError::InvalidValue(_) => "InvalidValue",
            WasmError::Store(s) => s.code(),
            WasmError::Server { code, .. } => code.as_str(),
            WasmError::InvalidUrl(_) => "InvalidUrl",
            WasmError::TooLarge(_) => "TooLarge",
            WasmError::NoServer => "NoServer",
            WasmError::Closed => "Closed",
            WasmError::Unsupported(_) => "Unsupported",
        }
    }
}

/// A JS `Error` with a `code` property.
pub fn js_error(code: &str, message: &str) -> JsValue {
    let err = js_sys::Error::new(message);
    err.set_name("SynclineError");
    // Setting a property on a fresh Error cannot fail.
    let _ = js_sys::Reflect::set(&err, &"code".into(), &code.into());
    err.into()
}

impl From<WasmError> for JsValue {
    fn from(e: WasmError) -> Self {
        js_error(e.code(), &e.to_string())
    }
}
