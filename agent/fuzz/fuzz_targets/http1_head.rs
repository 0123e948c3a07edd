//! HTTP/1 head parsing (complete and truncated heads) and the sniffers on arbitrary bytes.
//! The checks live in `tapwire::fuzzing::http1_head`, which the unit tests also run on the inputs
//! under agent/fuzz/regressions/http1_head/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tapwire::fuzzing::http1_head(data));
