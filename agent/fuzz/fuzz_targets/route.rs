//! http.route templating and configured patterns. Input: patterns (comma list) \n path \n path ...
//! The checks live in `tapwire::fuzzing::route`, which the unit tests also run on the inputs
//! under agent/fuzz/regressions/route/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tapwire::fuzzing::route(data));
