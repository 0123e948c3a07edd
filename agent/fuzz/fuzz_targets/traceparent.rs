//! W3C traceparent/tracestate parsing and the span ids derived from them. Input: traceparent \n tracestate.
//! The checks live in `tapwire::fuzzing::traceparent`, which the unit tests also run on the inputs
//! under agent/fuzz/regressions/traceparent/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tapwire::fuzzing::traceparent(data));
