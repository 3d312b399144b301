//! Fuzz the frame decoder: it must never panic, and any frame it accepts
//! must survive an encode/decode round trip unchanged.

#![no_main]

use libfuzzer_sys::fuzz_target;
use syncline_core::protocol;

fuzz_target!(|data: &[u8]| {
    if let Ok(msg) = protocol::decode(data, 1 << 20) {
        let frame = protocol::encode(&msg);
        match protocol::decode(&frame, usize::MAX) {
            Ok(again) => assert_eq!(again, msg, "round trip changed the message"),
            Err(e) => panic!("re-encoded frame does not decode: {e} ({msg:?})"),
        }
    }
});
