//! Maps and the per-flow bookkeeping shared by the programs: find or create a flow, apply the filter,
//! count events. Kept free of tracepoint details so each program stays a read-filter-aggregate step.

use agent_common::{
    CLOSED_RINGBUF_BYTES, Config, FILTER_CGROUP, FILTER_CIDR, FILTER_NETNS, FILTER_PORTS,
    FLOW_IGNORED, FlowState, KernelOffsets, LatencyHist, MAX_FLOWS, OFFSETS_VALID, bucket_index,
    counters, mapped_addr,
};
use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_NOEXIST},
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::map,
    maps::{Array, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, lpm_trie::Key},
};

#[map(name = "TF_FLOWS")]
pub static FLOWS: LruHashMap<u64, FlowState> = LruHashMap::with_max_entries(MAX_FLOWS, 0);

#[map(name = "TF_COUNTERS")]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(counters::COUNT, 0);

#[map(name = "TF_CONFIG")]
static CONFIG: Array<Config> = Array::with_max_entries(1, 0);

#[map(name = "TF_PORTS")]
static PORTS: Array<u8> = Array::with_max_entries(65536, 0);

#[map(name = "TF_CIDRS")]
static CIDRS: LpmTrie<[u8; 16], u8> = LpmTrie::with_max_entries(256, BPF_F_NO_PREALLOC);

#[map(name = "TF_CLOSED")]
pub static CLOSED: RingBuf = RingBuf::with_byte_size(CLOSED_RINGBUF_BYTES, 0);

/// Notification flags for a record going into [`CLOSED`]. The agent reads closed flows with each
/// window's snapshot, so waking it per record only costs: a connection-heavy node (the benchmark's
/// 200 connections a second) woke it about 340 times a second. It is woken only once the ring is
/// half full, to drain it before records are dropped (libbpf's adaptive notification).
#[inline(always)]
pub fn closed_wakeup() -> u64 {
    use aya_ebpf::bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP};
    if CLOSED.query(BPF_RB_AVAIL_DATA as u64) >= u64::from(CLOSED_RINGBUF_BYTES / 2) {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}

#[map(name = "TF_REQ_LAT")]
static REQ_LAT: PerCpuHashMap<u32, LatencyHist> = PerCpuHashMap::with_max_entries(1024, 0);

#[map(name = "TF_PROBE_LAT")]
static PROBE_LAT: PerCpuHashMap<u32, LatencyHist> = PerCpuHashMap::with_max_entries(256, 0);

/// A zeroed histogram to insert from: `LatencyHist` is larger than the BPF stack.
#[map(name = "TF_LAT_ZERO")]
static LAT_ZERO: Array<LatencyHist> = Array::with_max_entries(1, 0);

/// Scratch space for building a new flow: `FlowState` is larger than the 512-byte BPF stack. One
/// slot per creating program ([`Creator`]): a raw tracepoint program can run in a softirq that
/// interrupts the classic one on the same CPU (and the other way round), and a shared slot would
/// then hand one socket's half-built flow to the other.
#[map(name = "TF_SCRATCH")] // agent_common::maps::SCRATCH
static SCRATCH: PerCpuArray<FlowState> = PerCpuArray::with_max_entries(2, 0);

/// Which program creates a flow: each has its own scratch slot (a program never nests in itself).
#[derive(Clone, Copy)]
pub enum Creator {
    TcpProbe = 0,
    SetState = 1,
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(c) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot. A raw tracepoint program that interrupts another of ours on this
        // CPU between its load and its store can lose one count: these are diagnostics, and the
        // bpfel target has no atomic read-modify-write in `core` to rule it out.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// Identity of a socket as a tracepoint reports it.
pub struct Tuple {
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
}

/// What the flow map holds for a socket.
pub enum Lookup {
    Tracked(*mut FlowState),
    /// Tracked, but the filter excludes it.
    Ignored,
    Missing,
}

#[inline(always)]
pub fn lookup(sk: u64) -> Lookup {
    let Some(flow) = FLOWS.get_ptr_mut(sk) else {
        return Lookup::Missing;
    };
    // SAFETY: map value pointer returned by the kernel for this key.
    if unsafe { (*flow).flags } & FLOW_IGNORED != 0 {
        count(counters::FILTERED_EVENTS);
        return Lookup::Ignored;
    }
    Lookup::Tracked(flow)
}

/// As [`lookup`], without counting filtered events (for hooks that are not capture events).
#[inline(always)]
pub fn lookup_quiet(sk: u64) -> Lookup {
    let Some(flow) = FLOWS.get_ptr_mut(sk) else {
        return Lookup::Missing;
    };
    // SAFETY: map value pointer returned by the kernel for this key.
    if unsafe { (*flow).flags } & FLOW_IGNORED != 0 {
        return Lookup::Ignored;
    }
    Lookup::Tracked(flow)
}

/// The kernel structures' field offsets, once user space has written them (always, before it
/// attaches: the agent refuses to start without the kernel's BTF).
#[inline(always)]
pub fn offsets() -> Option<&'static KernelOffsets> {
    let cfg = CONFIG.get(0)?;
    if cfg.flags & OFFSETS_VALID == 0 {
        return None;
    }
    Some(&cfg.offsets)
}

/// Reads a kernel value at `base + off`; zeroes (the default) when the read faults.
#[inline(always)]
pub fn read_kernel<T: Default>(base: u64, off: u32) -> T {
    // SAFETY: bpf_probe_read_kernel validates the address and fails cleanly on a bad one.
    unsafe { bpf_probe_read_kernel((base + off as u64) as *const T) }.unwrap_or_default()
}

/// Creates the flow for `sk` (first event seen for it), applying the filter once per flow.
/// Returns `None` when the filter excludes it or the map is full.
#[inline(always)]
pub fn create(sk: u64, tuple: &Tuple, pid: u32, by: Creator) -> Option<*mut FlowState> {
    let cfg = CONFIG.get(0)?;
    let scratch = SCRATCH.get_ptr_mut(by as u32)?;
    // SAFETY: per-CPU scratch slot of this program, which does not nest in itself: exclusively
    // ours for the duration of this run.
    let flow = unsafe { &mut *scratch };
    *flow = FlowState::zeroed();
    flow.sk = sk;
    flow.family = tuple.family;
    flow.sport = tuple.sport;
    flow.dport = tuple.dport;
    flow.saddr = tuple.saddr;
    flow.daddr = tuple.daddr;
    flow.pid = pid;
    flow.first_seen_ns = now_ns();
    if cfg.flags & OFFSETS_VALID != 0 {
        let o = &cfg.offsets;
        let net: u64 = read_kernel(sk, o.sock_net);
        if net != 0 {
            flow.netns = read_kernel(net, o.net_inum);
        }
        let cgroup: u64 = read_kernel(sk, o.sock_cgroup);
        if cgroup != 0 {
            let kn: u64 = read_kernel(cgroup, o.cgroup_kn);
            if kn != 0 {
                flow.cgroup_id = read_kernel(kn, o.kernfs_id);
            }
        }
        // A socket first seen mid-life has retransmitted before: those are not this flow's.
        flow.retrans_base = read_kernel(sk, o.tcp_total_retrans);
    }
    if !admitted(cfg, flow) {
        flow.flags |= FLOW_IGNORED;
    }
    let ignored = flow.flags & FLOW_IGNORED != 0;
    // Insert from the scratch slot by reference: a by-value copy would not fit the 512-byte stack.
    let value: &FlowState = flow;
    if FLOWS.insert(sk, value, BPF_NOEXIST as u64).is_err() {
        // Another CPU created it first (then use that one), or the map refused the insert.
        return match FLOWS.get_ptr_mut(sk) {
            Some(existing) if !ignored => Some(existing),
            Some(_) => None,
            None => {
                count(counters::FLOW_INSERT_FAILED);
                None
            }
        };
    }
    count(counters::FLOWS_CREATED);
    if ignored {
        count(counters::FILTERED_EVENTS);
        return None;
    }
    FLOWS.get_ptr_mut(sk)
}

#[inline(always)]
fn admitted(cfg: &Config, flow: &FlowState) -> bool {
    if cfg.flags & FILTER_PORTS != 0 {
        let local = PORTS.get(flow.sport as u32).copied().unwrap_or(0);
        let remote = PORTS.get(flow.dport as u32).copied().unwrap_or(0);
        if local == 0 && remote == 0 {
            return false;
        }
    }
    if cfg.flags & FILTER_NETNS != 0 && flow.netns != cfg.netns {
        return false;
    }
    if cfg.flags & FILTER_CGROUP != 0 && flow.cgroup_id != cfg.cgroup_id {
        return false;
    }
    if cfg.flags & FILTER_CIDR != 0 {
        let key = Key::new(128, mapped_addr(flow.family, &flow.daddr));
        if CIDRS.get(&key).is_none() {
            return false;
        }
    }
    true
}

/// Segments in a TCP skb (`tcp_skb_pcount()`: `TCP_SKB_CB(skb)->tcp_gso_segs`), 1 when unknown.
#[inline(always)]
pub fn skb_segments(skb: u64) -> u64 {
    let Some(cfg) = CONFIG.get(0) else { return 1 };
    if cfg.flags & OFFSETS_VALID == 0 || skb == 0 {
        return 1;
    }
    let segs: u16 = read_kernel(skb, cfg.offsets.skb_gso_segs);
    if segs == 0 { 1 } else { segs as u64 }
}

/// Brings `f.retrans_segs` up to the kernel's own `tcp_sock.total_retrans` (less what the socket
/// had retransmitted before the flow was first seen). Called on each retransmit and state change
/// (not per ACK: that program stays cheap), so the count is the kernel's own at each of them and
/// at close. Returns false when the offsets are unknown (then the tracepoint's segment count is
/// all there is).
#[inline(always)]
pub fn sync_retrans(f: &mut FlowState) -> bool {
    let Some(cfg) = CONFIG.get(0) else {
        return false;
    };
    if cfg.flags & OFFSETS_VALID == 0 {
        return false;
    }
    // SAFETY: bpf_probe_read_kernel validates the address and fails cleanly on a bad one.
    let Ok(total) = (unsafe {
        bpf_probe_read_kernel((f.sk + cfg.offsets.tcp_total_retrans as u64) as *const u32)
    }) else {
        return false;
    };
    let segs = u64::from(total.saturating_sub(f.retrans_base));
    if segs > f.retrans_segs {
        f.retrans_segs = segs;
    }
    true
}

/// Which latency map a sample goes to.
pub enum Latency {
    /// Served request, keyed by local port.
    Request,
    /// uprobe target, keyed by probe id.
    Probe,
}

/// Adds one latency sample (ns) to this CPU's histogram for `key`.
#[inline(always)]
pub fn record_latency(which: Latency, key: u32, ns: u64) {
    let map = match which {
        Latency::Request => &REQ_LAT,
        Latency::Probe => &PROBE_LAT,
    };
    let slot = match map.get_ptr_mut(key) {
        Some(p) => p,
        None => {
            let Some(zero) = LAT_ZERO.get(0) else { return };
            if map.insert(key, zero, 0).is_err() {
                return;
            }
            match map.get_ptr_mut(key) {
                Some(p) => p,
                None => return,
            }
        }
    };
    let us = ns / 1000;
    let v = if us > u32::MAX as u64 {
        u32::MAX
    } else {
        us as u32
    };
    // SAFETY: this CPU's slot of a per-CPU map value.
    let h = unsafe { &mut *slot };
    h.count += 1;
    h.sum_us += us;
    // Through black_box, so the bounds check and the access use one register: otherwise LLVM checks
    // a copy and indexes with another, and the verifier rejects the unbounded access.
    let idx = core::hint::black_box(bucket_index(v));
    if let Some(b) = h.hist.get_mut(idx) {
        *b += 1;
    }
}
