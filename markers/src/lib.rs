//! Probe points that are cheap to trace.
//!
//! A uprobe normally replaces the first byte of the probed instruction with
//! `int3`; every call then traps into the kernel and single-steps the original
//! instruction, which costs 10–15 µs per call on a virtual machine. Since Linux
//! 6.18 the kernel optimises a uprobe placed on the 5-byte nop
//! `0f 1f 44 00 00` into a `call` to a trampoline (the same trick USDT probes
//! use), and the return probe leaves through the `uretprobe` syscall: entry
//! plus return then cost a few hundred nanoseconds.
//!
//! [`probe_point!`] defines an exported function whose first instruction is
//! that nop and which then jumps to the real body, so a uprobe on the exported
//! name measures the body from entry to return at the optimised cost. On other
//! architectures it is an ordinary exported wrapper.

/// The 5-byte nop that Linux's optimised uprobes recognise.
pub const NOP5: [u8; 5] = [0x0f, 0x1f, 0x44, 0x00, 0x00];

/// Defines `#[no_mangle] extern "C" fn $name(args) -> ret` that starts with
/// [`NOP5`] and tail-calls `$body`, an `extern "C" fn` with the same
/// signature.
///
/// ```
/// extern "C" fn work(x: u64) -> u64 { x + 1 }
/// tokenflow_markers::probe_point!(pub fn doc_example_work(x: u64) -> u64 => work);
/// assert_eq!(doc_example_work(1), 2);
/// ```
#[macro_export]
macro_rules! probe_point {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? => $body:path) => {
        $(#[$m])*
        #[cfg(target_arch = "x86_64")]
        #[unsafe(no_mangle)]
        #[unsafe(naked)]
        $vis extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            ::core::arch::naked_asm!(
                ".byte 0x0f, 0x1f, 0x44, 0x00, 0x00",
                "jmp {body}",
                body = sym $body,
            )
        }

        $(#[$m])*
        #[cfg(not(target_arch = "x86_64"))]
        #[unsafe(no_mangle)]
        #[inline(never)]
        $vis extern "C" fn $name($($arg: $ty),*) $(-> $ret)? {
            $body($($arg),*)
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" fn add(a: u64, b: u64) -> u64 {
        a.wrapping_add(b)
    }
    probe_point!(fn tokenflow_markers_test_add(a: u64, b: u64) -> u64 => add);

    extern "C" fn nothing() {}
    probe_point!(fn tokenflow_markers_test_nothing() => nothing);

    #[test]
    fn arguments_and_result_pass_through() {
        assert_eq!(tokenflow_markers_test_add(40, 2), 42);
        assert_eq!(tokenflow_markers_test_add(u64::MAX, 1), 0);
        tokenflow_markers_test_nothing();
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn entry_is_the_optimisable_nop() {
        for f in [
            tokenflow_markers_test_add as *const u8,
            tokenflow_markers_test_nothing as *const () as *const u8,
        ] {
            // SAFETY: reading the first bytes of a function's own code, which is mapped readable.
            let code = unsafe { std::slice::from_raw_parts(f, 5) };
            assert_eq!(code, NOP5);
        }
    }
}
