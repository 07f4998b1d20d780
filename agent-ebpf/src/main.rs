//! TokenFlow's kernel programs: per-flow TCP state (RTT histogram, retransmits, state changes) kept in
//! kernel maps, so user-space cost does not grow with the event rate. Only closed flows use a ring buffer.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
#![allow(clippy::missing_safety_doc)]

#[cfg(target_arch = "bpf")]
mod flow;
#[cfg(target_arch = "bpf")]
mod programs;
#[cfg(target_arch = "bpf")]
mod uprobes;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    // Host builds (clippy, `cargo test --workspace`) compile this crate but never run it.
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program in which a panic path is reachable.
    unsafe { core::hint::unreachable_unchecked() }
}

/// The license the kernel checks before it allows GPL-only helpers (`bpf_probe_read_kernel`, ring buffers).
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
