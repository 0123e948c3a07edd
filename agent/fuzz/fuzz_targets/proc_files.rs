//! /proc and cgroup file parsers (environ, cmdline, stat, status, cgroup, net/tcp). Byte 0 picks the file.
//! The checks live in `tapwire::fuzzing::proc_files`, which the unit tests also run on the inputs
//! under agent/fuzz/regressions/proc_files/.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| tapwire::fuzzing::proc_files(data));
