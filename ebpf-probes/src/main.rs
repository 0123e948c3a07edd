//! tapwire's kernel programs. Tracepoints only: this platform has no kprobes and no fentry.
//!
//! One syscall on a TCP socket of a selected process becomes one ring-buffer event:
//!   sys_enter_*          stores the syscall's arguments per thread (after the cgroup filter),
//!   sock:sock_*_length   fires inside the syscall, in the same thread, and tells us the fd is a
//!                        TCP socket and which `struct sock` it is,
//!   sys_exit_*           emits header + payload prefix when the syscall moved bytes.
//! sock:inet_sock_set_state records each connection's endpoints and role (client/server) by
//! `struct sock` address; it fires in softirq context too, so nothing there trusts the pid.
#![no_std]
#![feature(core_intrinsics)]
#![expect(internal_features, reason = "atomic add on map values: core::sync::atomic has no fetch_add for the BPF target")]
#![no_main]

mod context;
mod inject;
mod maps;
mod sock;
mod syscalls;
mod tcp;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 4] = *b"GPL\0";
