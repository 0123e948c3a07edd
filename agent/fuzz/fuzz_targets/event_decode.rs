//! Ring-buffer record decoding: any bytes either decode or give an error, never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tapwire::capture::event::{Event, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok(event) = Event::decode(data) {
        // A decoded data event's payload is inside the record.
        if let Event::Data(d) = &event {
            assert!(d.payload.len() <= data.len());
            assert!(d.payload.len() as u64 <= u64::from(d.total_len));
        }
        let _ = encode;
    }
});
