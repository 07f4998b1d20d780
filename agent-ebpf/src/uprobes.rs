//! uprobe / uretprobe pair: entry→return latency of a function in any binary, per thread. Attached
//! once per `--uprobe` target, each attachment with its probe id as the BPF cookie.

use aya_ebpf::{
    EbpfContext,
    helpers::{bpf_get_current_pid_tgid, generated::bpf_get_attach_cookie},
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};

use crate::flow::{self, Latency};

/// (probe id << 32 | thread id) → entry time. LRU, so calls that never return cannot fill it.
#[map(name = "TF_PROBE_START")]
static PROBE_START: LruHashMap<u64, u64> = LruHashMap::with_max_entries(65536, 0);

#[inline(always)]
fn key(ctx: &impl EbpfContext) -> (u64, u32) {
    // SAFETY: the context pointer the kernel gave this program.
    let probe = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let tid = bpf_get_current_pid_tgid() & 0xffff_ffff;
    ((u64::from(probe) << 32) | tid, probe)
}

/// Function entry: remember when this thread entered (a recursive call restarts the clock).
#[uprobe]
pub fn tf_uprobe_entry(ctx: ProbeContext) -> u32 {
    let (k, _) = key(&ctx);
    let _ = PROBE_START.insert(k, flow::now_ns(), 0);
    0
}

/// Function return: the time since this thread's entry is one sample for the probe.
#[uretprobe]
pub fn tf_uprobe_return(ctx: RetProbeContext) -> u32 {
    let (k, probe) = key(&ctx);
    // SAFETY: value copied out at once; a concurrent remove can only make the read stale.
    if let Some(start) = unsafe { PROBE_START.get(k) }.copied() {
        let _ = PROBE_START.remove(k);
        flow::record_latency(Latency::Probe, probe, flow::now_ns().saturating_sub(start));
    }
    0
}

/// (span id, request id) → time the span's start marker was called. The request id is the
/// markers' first argument, so a span may start on one thread and end on another (a request is
/// accepted by an HTTP worker and scheduled by the engine thread). LRU, so requests that never
/// reach the end marker cannot fill it.
#[map(name = "TF_SPAN_START")]
static SPAN_START: LruHashMap<[u64; 2], u64> = LruHashMap::with_max_entries(65536, 0);

#[inline(always)]
fn span_key(ctx: &ProbeContext) -> Option<([u64; 2], u32)> {
    // SAFETY: the context pointer the kernel gave this program.
    let span = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let request: u64 = ctx.arg(0)?;
    Some(([u64::from(span), request], span))
}

/// A span's start marker: remember when this request passed it.
#[uprobe]
pub fn tf_span_start(ctx: ProbeContext) -> u32 {
    if let Some((k, _)) = span_key(&ctx) {
        let _ = SPAN_START.insert(k, flow::now_ns(), 0);
    }
    0
}

/// A span's end marker: the time since the same request passed the start marker is one sample
/// for the span (recorded under the span's probe id, beside the `--uprobe` targets).
#[uprobe]
pub fn tf_span_end(ctx: ProbeContext) -> u32 {
    let Some((k, span)) = span_key(&ctx) else {
        return 0;
    };
    // SAFETY: value copied out at once; a concurrent remove can only make the read stale.
    if let Some(start) = unsafe { SPAN_START.get(k) }.copied() {
        let _ = SPAN_START.remove(k);
        flow::record_latency(Latency::Probe, span, flow::now_ns().saturating_sub(start));
    }
    0
}
