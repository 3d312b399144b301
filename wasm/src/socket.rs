//! The browser transport: a `web-sys` WebSocket carrying binary frames, and
//! the timers used for jittered reconnection backoff.
//!
//! A [`Socket`] turns the socket's callbacks into [`SocketEvent`]s for one
//! handler; dropping it detaches the handlers and closes the socket, so a
//! stale connection can never feed the client.

use js_sys::{ArrayBuffer, Function, Uint8Array};
use wasm_bindgen::prelude::*;
use web_sys::{BinaryType, CloseEvent, Event, MessageEvent, WebSocket};

#[wasm_bindgen]
extern "C" {
    #[wasm_bindgen(js_name = setTimeout)]
    fn set_timeout(handler: &Function, ms: i32) -> JsValue;
    #[wasm_bindgen(js_name = clearTimeout)]
    fn clear_timeout(id: &JsValue);
}

/// What the socket reports.
#[derive(Debug)]
pub enum SocketEvent {
    /// The connection is open.
    Open,
    /// A binary frame arrived.
    Frame(Vec<u8>),
    /// The connection closed or failed (reported once).
    Closed,
}

/// An open (or opening) WebSocket with its handlers.
pub struct Socket {
    ws: WebSocket,
    _on_open: Closure<dyn FnMut(Event)>,
    _on_message: Closure<dyn FnMut(MessageEvent)>,
    _on_close: Closure<dyn FnMut(CloseEvent)>,
    _on_error: Closure<dyn FnMut(Event)>,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket")
            .field("url", &self.ws.url())
            .finish()
    }
}

impl Socket {
    /// Start connecting to `url` with the global `WebSocket`, or with
    /// `class` (any class with the browser's WebSocket interface, such as
    /// the `ws` package's in Node); `handler` receives every event. Fails
    /// only when the URL is unusable.
    pub fn open(
        url: &str,
        class: Option<&Function>,
        handler: impl Fn(SocketEvent) + 'static,
    ) -> Result<Self, String> {
        let ws = match class {
            None => WebSocket::new(url),
            // web-sys calls its methods by name, so an object with the
            // same interface serves (no instanceof check is made).
            Some(class) => {
                js_sys::Reflect::construct(class, &js_sys::Array::of1(&JsValue::from_str(url)))
                    .map(JsCast::unchecked_into::<WebSocket>)
            }
        }
        .map_err(|e| {
            e.dyn_ref::<js_sys::Error>()
                .map(|e| String::from(e.message()))
                .unwrap_or_else(|| format!("cannot open a WebSocket to {url:?}"))
        })?;
        ws.set_binary_type(BinaryType::Arraybuffer);
        let handler = std::rc::Rc::new(handler);
        let closed = std::rc::Rc::new(std::cell::Cell::new(false));

        let h = handler.clone();
        let on_open = Closure::<dyn FnMut(Event)>::new(move |_| h(SocketEvent::Open));
        let h = handler.clone();
        let on_message = Closure::<dyn FnMut(MessageEvent)>::new(move |e: MessageEvent| {
            // Text frames are not part of the protocol; the server never sends them.
            if let Ok(buf) = e.data().dyn_into::<ArrayBuffer>() {
                h(SocketEvent::Frame(Uint8Array::new(&buf).to_vec()));
            }
        });
        let (h, c) = (handler.clone(), closed.clone());
        let on_close = Closure::<dyn FnMut(CloseEvent)>::new(move |_| {
            if !c.replace(true) {
                h(SocketEvent::Closed);
            }
        });
        let (h, c) = (handler, closed);
        let on_error = Closure::<dyn FnMut(Event)>::new(move |_| {
            if !c.replace(true) {
                h(SocketEvent::Closed);
            }
        });
        ws.set_onopen(Some(on_open.as_ref().unchecked_ref()));
        ws.set_onmessage(Some(on_message.as_ref().unchecked_ref()));
        ws.set_onclose(Some(on_close.as_ref().unchecked_ref()));
        ws.set_onerror(Some(on_error.as_ref().unchecked_ref()));
        Ok(Socket {
            ws,
            _on_open: on_open,
            _on_message: on_message,
            _on_close: on_close,
            _on_error: on_error,
        })
    }

    /// Send one frame if the socket is open (frames sent while connecting
    /// or closing are dropped; the core client resends after reconnecting).
    pub fn send(&self, frame: &[u8]) {
        if self.ws.ready_state() == WebSocket::OPEN {
            let _ = self.ws.send_with_u8_array(frame);
        }
    }
}

thread_local! {
    /// A handler that ignores its event, made once and never freed.
    static IGNORE: JsValue = Closure::<dyn FnMut(JsValue)>::new(|_: JsValue| {}).into_js_value();
}

impl Drop for Socket {
    fn drop(&mut self) {
        self.ws.set_onopen(None);
        self.ws.set_onmessage(None);
        self.ws.set_onclose(None);
        // Not `None`: closing a socket that is still connecting makes it
        // fail with an `error` event, and the `ws` package (Node) throws
        // an `error` event nobody listens to, killing the process.
        IGNORE.with(|f| self.ws.set_onerror(Some(f.unchecked_ref())));
        let _ = self.ws.close();
    }
}

/// A pending `setTimeout`; dropping it cancels the call.
pub struct Timer {
    id: JsValue,
    _callback: Closure<dyn FnMut()>,
}

impl std::fmt::Debug for Timer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Timer")
    }
}

impl Timer {
    /// Call `f` once after `ms` milliseconds.
    pub fn new(ms: u32, f: impl FnOnce() + 'static) -> Self {
        let mut f = Some(f);
        let callback = Closure::<dyn FnMut()>::new(move || {
            if let Some(f) = f.take() {
                f();
            }
        });
        let id = set_timeout(
            callback.as_ref().unchecked_ref(),
            i32::try_from(ms).unwrap_or(i32::MAX),
        );
        Timer {
            id,
            _callback: callback,
        }
    }
}

impl Drop for Timer {
    fn drop(&mut self) {
        clear_timeout(&self.id);
    }
}

/// Drop `value` in a later microtask: a socket or timer must not be dropped
/// from inside one of its own callbacks (the running closure would be freed).
pub fn defer_drop<T: 'static>(value: T) {
    wasm_bindgen_futures::spawn_local(async move { drop(value) });
}

/// Exponential backoff from 100 ms up to `max_ms`, each wait drawn between
/// half and all of it so that many clients do not reconnect in step.
pub fn jittered_backoff(attempts: u32, max_ms: u32) -> u32 {
    let base = 100u64
        .saturating_mul(1 << attempts.min(10))
        .min(u64::from(max_ms));
    let r = js_sys::Math::random();
    (base as f64 * (0.5 + r / 2.0)) as u32
}
