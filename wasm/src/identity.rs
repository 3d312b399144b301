//! The replica's key in the browser: an Ed25519 WebCrypto key pair whose
//! private half is non-extractable (script on the page can sign with it
//! while it runs, but cannot copy it out), kept in the replica's IndexedDB
//! database. The replica id is derived from the public key, and every
//! connection's `Hello` carries a fresh signature
//! (`syncline_core::identity`).
//!
//! A file store (Node) keeps the key in `meta/replica-key` (mode 0600, as
//! the native client does): the raw public key, then the private key as
//! PKCS #8, exported once at creation and imported non-extractable.

use js_sys::{Array, Function, Object, Promise, Reflect, Uint8Array};
use syncline_core::ReplicaId;
use syncline_core::identity::{self, Proof};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

use crate::error::WasmError;
use crate::store::BrowserStore;

/// Where the key pair is kept in the `meta` object store.
const KEY_META: &str = "replica-key";

/// The replica's key pair.
#[derive(Debug)]
pub struct Signer {
    private: JsValue,
    public: [u8; 32],
}

fn unsupported(what: &str, e: JsValue) -> WasmError {
    let detail = e
        .dyn_ref::<js_sys::Error>()
        .map(|e| String::from(e.message()))
        .unwrap_or_else(|| format!("{e:?}"));
    WasmError::Unsupported(format!(
        "{what}: {detail} (Syncline needs WebCrypto with Ed25519: Chrome 137+, Firefox 129+, Safari 17+, Node 20+)"
    ))
}

/// `globalThis.crypto.subtle`.
fn subtle() -> Result<JsValue, WasmError> {
    let crypto = Reflect::get(&js_sys::global(), &"crypto".into())
        .map_err(|e| unsupported("no crypto", e))?;
    let subtle =
        Reflect::get(&crypto, &"subtle".into()).map_err(|e| unsupported("no crypto.subtle", e))?;
    if subtle.is_undefined() {
        // Pages served over plain http from another host have no subtle.
        return Err(WasmError::Unsupported(
            "crypto.subtle is unavailable: serve the page over https (or from localhost)".into(),
        ));
    }
    Ok(subtle)
}

/// Call `subtle[method](...args)` and await its promise.
async fn call(method: &str, args: &[JsValue]) -> Result<JsValue, WasmError> {
    let subtle = subtle()?;
    let f: Function = Reflect::get(&subtle, &method.into())
        .and_then(|f| f.dyn_into())
        .map_err(|e| unsupported(method, e))?;
    let promise: Promise = f
        .apply(&subtle, &args.iter().collect::<Array>())
        .and_then(|p| p.dyn_into())
        .map_err(|e| unsupported(method, e))?;
    JsFuture::from(promise)
        .await
        .map_err(|e| unsupported(method, e))
}

fn ed25519() -> JsValue {
    let algo = Object::new();
    let _ = Reflect::set(&algo, &"name".into(), &"Ed25519".into());
    algo.into()
}

async fn public_key(pair: &JsValue) -> Result<[u8; 32], WasmError> {
    let public = Reflect::get(pair, &"publicKey".into()).map_err(|e| unsupported("key", e))?;
    let raw = call("exportKey", &["raw".into(), public]).await?;
    Uint8Array::new(&raw)
        .to_vec()
        .try_into()
        .map_err(|_| WasmError::Unsupported("an Ed25519 public key is 32 bytes".into()))
}

impl Signer {
    /// The store's key pair, made on first use. Memory stores get a fresh
    /// one (their replica is new every time anyway).
    pub async fn load_or_create(store: &BrowserStore) -> Result<Signer, WasmError> {
        if let BrowserStore::Files(files) = store {
            return Self::from_file(files).await;
        }
        let kept = store.get_meta_value(KEY_META).await?;
        let pair = match kept.filter(|v| v.is_object()) {
            Some(pair) => pair,
            None => {
                let usages = Array::of2(&"sign".into(), &"verify".into());
                // `false`: the private key cannot be exported.
                let pair = call("generateKey", &[ed25519(), JsValue::FALSE, usages.into()]).await?;
                store.put_meta_value(KEY_META, &pair).await?;
                pair
            }
        };
        let private =
            Reflect::get(&pair, &"privateKey".into()).map_err(|e| unsupported("key", e))?;
        let public = public_key(&pair).await?;
        Ok(Signer { private, public })
    }

    /// The key a file store keeps (made and written on first use).
    async fn from_file(files: &crate::files::FileStore) -> Result<Signer, WasmError> {
        let usages = || Array::of1(&"sign".into());
        let kept = match files.get_meta(KEY_META).await? {
            Some(kept) => kept,
            None => {
                // Extractable once, to be written; used as imported below.
                let both = Array::of2(&"sign".into(), &"verify".into());
                let pair = call("generateKey", &[ed25519(), JsValue::TRUE, both.into()]).await?;
                let private =
                    Reflect::get(&pair, &"privateKey".into()).map_err(|e| unsupported("key", e))?;
                let pkcs8 = call("exportKey", &["pkcs8".into(), private]).await?;
                let mut kept = public_key(&pair).await?.to_vec();
                kept.extend(Uint8Array::new(&pkcs8).to_vec());
                files.put_meta(KEY_META, &kept, true).await?;
                kept
            }
        };
        let bad = || {
            WasmError::Store(crate::store::StoreError::Files(format!(
                "meta/{KEY_META} does not hold a replica key"
            )))
        };
        let (public, pkcs8) = kept.split_at_checked(32).ok_or_else(bad)?;
        let public: [u8; 32] = public.try_into().map_err(|_| bad())?;
        let pkcs8 = Uint8Array::from(pkcs8);
        let private = call(
            "importKey",
            &[
                "pkcs8".into(),
                pkcs8.into(),
                ed25519(),
                JsValue::FALSE,
                usages().into(),
            ],
        )
        .await
        .map_err(|_| bad())?;
        Ok(Signer { private, public })
    }

    /// The replica id this key owns.
    pub fn replica(&self) -> ReplicaId {
        identity::replica_of_key(&self.public)
    }

    /// A proof for one connection to `host`, now.
    pub async fn prove(&self, host: &str) -> Result<Proof, WasmError> {
        let time_ms = js_sys::Date::now() as u64;
        let nonce = ReplicaId::random().0;
        let msg = identity::signed_message(&self.public, host, time_ms, &nonce);
        let data = Uint8Array::from(&msg[..]);
        let sig = call("sign", &[ed25519(), self.private.clone(), data.into()]).await?;
        let sig: [u8; 64] = Uint8Array::new(&sig)
            .to_vec()
            .try_into()
            .map_err(|_| WasmError::Unsupported("an Ed25519 signature is 64 bytes".into()))?;
        Ok(Proof {
            key: self.public,
            host: host.to_owned(),
            time_ms,
            nonce,
            sig,
        })
    }
}
