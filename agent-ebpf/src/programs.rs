//! The TCP tracepoint programs. `tcp_probe` reads its record, at offsets in
//! `agent_common::tracepoints` checked against the running kernel's format file by a test; the raw
//! tracepoints read their arguments by position and the socket at offsets from the kernel's BTF.

use agent_common::{
    AF_INET, AF_INET6, FLOW_HAVE_UNA, IPPROTO_TCP, KernelOffsets, TCP_CLOSE, TCP_LISTEN,
    TCP_SYN_RECV, TCP_SYN_SENT, bucket_index, counters, rtt_sample_us,
    tracepoints::tcp_probe as tp,
};
use aya_ebpf::{
    EbpfContext,
    helpers::bpf_get_current_pid_tgid,
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};

use crate::flow::{self, CLOSED, Creator, FLOWS, Lookup, Tuple};

/// Direct load from the tracepoint record. Only for naturally aligned fields: the verifier allows
/// aligned context loads, which cost far less than `bpf_probe_read_kernel`.
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, off: usize) -> T {
    // SAFETY: `off` comes from the checked format offsets and is aligned for `T`.
    unsafe { core::ptr::read((ctx.as_ptr() as *const u8).add(off) as *const T) }
}

/// Reads a possibly unaligned field through `bpf_probe_read_kernel` (off the hot path only).
#[inline(always)]
fn read<T: Default>(ctx: &TracePointContext, off: usize) -> T {
    // SAFETY: the offset lies inside the record described by the format file.
    unsafe { ctx.read_at::<T>(off) }.unwrap_or_default()
}

/// `tcp:tcp_probe` — see `agent_common::tracepoints::tcp_probe` for the record.
/// One RTT sample per incoming segment on an established socket: per-flow and node histograms,
/// cwnd, bytes in flight, bytes newly acknowledged.
#[tracepoint(category = "tcp", name = "tcp_probe")]
pub fn tf_tcp_probe(ctx: TracePointContext) -> u32 {
    flow::count(counters::PROBE_EVENTS);
    let sk: u64 = field(&ctx, tp::SKADDR);
    let flow = match flow::lookup(sk) {
        Lookup::Tracked(f) => f,
        Lookup::Ignored => return 0,
        Lookup::Missing => {
            let family: u16 = field(&ctx, tp::FAMILY);
            let mut t = Tuple {
                family,
                sport: field(&ctx, tp::SPORT),
                dport: field(&ctx, tp::DPORT),
                saddr: [0; 16],
                daddr: [0; 16],
            };
            // saddr/daddr hold a sockaddr_in (address at +4) or a sockaddr_in6 (address at +8).
            if family == AF_INET {
                t.saddr[..4].copy_from_slice(&field::<[u8; 4]>(&ctx, tp::SADDR + 4));
                t.daddr[..4].copy_from_slice(&field::<[u8; 4]>(&ctx, tp::DADDR + 4));
            } else {
                t.saddr = read(&ctx, tp::SADDR + 8);
                t.daddr = read(&ctx, tp::DADDR + 8);
            }
            match flow::create(sk, &t, 0, Creator::TcpProbe) {
                Some(f) => f,
                None => return 0,
            }
        }
    };
    let srtt: u32 = field(&ctx, tp::SRTT);
    let una: u32 = field(&ctx, tp::SND_UNA);
    let nxt: u32 = field(&ctx, tp::SND_NXT);
    // SAFETY: map value pointer; updates of one flow are serialised by the socket lock.
    let f = unsafe { &mut *flow };
    if f.cookie == 0 {
        f.cookie = field(&ctx, tp::SOCK_COOKIE);
        f.sport = field(&ctx, tp::SPORT);
    }
    let srtt_before = f.last_srtt_us;
    f.last_srtt_us = srtt;
    f.snd_cwnd = field(&ctx, tp::SND_CWND);
    f.bytes_in_flight = nxt.wrapping_sub(una);
    // tcp_probe fires on every segment the socket receives, but srtt only moves when an ACK covers
    // new data. A socket that mostly receives (a server taking an upload) would otherwise repeat the
    // srtt of its last reply once per incoming segment — seconds stale, and weighted by the upload's
    // size. Only an ACK that advanced snd_una is an RTT sample.
    let mut fresh = false;
    if f.flags & FLOW_HAVE_UNA != 0 {
        let acked = una.wrapping_sub(f.last_snd_una);
        // A backwards step (reordered sample) is not new data acknowledged.
        if acked < (1 << 31) {
            f.bytes_acked += acked as u64;
            fresh = acked > 0;
        }
    }
    f.last_snd_una = una;
    f.flags |= FLOW_HAVE_UNA;
    if fresh {
        // The sample that ACK gave, not the smoothed estimate, which carries each sample on for
        // about eight more (see `rtt_sample_us`).
        let sample = rtt_sample_us(srtt_before, srtt);
        f.rtt_samples += 1;
        f.rtt_sum_us += sample as u64;
        if let Some(slot) = f.rtt_hist.get_mut(bucket_index(sample)) {
            *slot += 1;
        }
    }
    // A request reaching a connection this host accepted, with no response pending: its clock starts.
    if f.req_start_ns == 0 && f.states_seen & (1 << TCP_SYN_RECV) != 0 {
        let data_len: u16 = field(&ctx, tp::DATA_LEN);
        if data_len > 0 {
            f.req_start_ns = flow::now_ns();
        }
    }
    0
}

/// raw tracepoint `tcp_retransmit_skb` —
/// `TP_PROTO(const struct sock *sk, const struct sk_buff *skb, int err)` (checked against the kernel's
/// BTF `btf_trace_tcp_retransmit_skb` by a test). A raw tracepoint, not the classic one (see
/// `agent_common::programs`): a skipped retransmit would leave the count short of the kernel's.
///
/// Counts segments as the kernel's `total_retrans` does, by reading that counter (see
/// [`flow::sync_retrans`], also run on every state change of the flow): summing skb
/// segment counts here fell one short of `ss` now and then under heavy loss. Without the BTF offsets
/// it falls back to that sum. `__tcp_retransmit_skb()` adds the skb's segment count to `total_retrans`
/// once it has decided to send, before `tcp_transmit_skb()`; the tracepoint fires at the end with
/// `err`. Errors from before that point (-EBUSY: still in a host queue, -EAGAIN, -ENOMEM, -EINVAL)
/// sent and counted nothing; any other result, success or a failed transmit (e.g. -ENOBUFS from a
/// full device queue), was counted by the kernel.
#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn tf_tcp_retransmit_skb(ctx: RawTracePointContext) -> i32 {
    flow::count(counters::RETRANSMIT_EVENTS);
    // Raw arguments are the C values zero-extended to 64 bits.
    let err = ctx.arg::<u64>(2) as u32 as i32;
    const EAGAIN: i32 = 11;
    const ENOMEM: i32 = 12;
    const EBUSY: i32 = 16;
    const EINVAL: i32 = 22;
    if matches!(-err, EAGAIN | ENOMEM | EBUSY | EINVAL) {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    let flow = match flow::lookup(sk) {
        Lookup::Tracked(f) => f,
        Lookup::Ignored => return 0,
        // Flows are created by connect/accept and by their first incoming segment; a socket that
        // retransmits before either (one open before the agent started) is counted apart.
        Lookup::Missing => {
            flow::count(counters::RETRANSMIT_UNTRACKED);
            return 0;
        }
    };
    // SAFETY: as in `tf_tcp_probe`.
    let f = unsafe { &mut *flow };
    if !flow::sync_retrans(f) {
        f.retrans_segs += flow::skb_segments(ctx.arg(1));
    }
    f.retrans_events += 1;
    if f.sport == 0
        && let Some(o) = flow::offsets()
    {
        // A SYN sent again: the port was picked before the first one. (User space holds a flow
        // back from its windows until its port is known.)
        f.sport = local_port(sk, o);
    }
    0
}

/// The socket's local port in host order (0 while connect() has not picked it yet).
#[inline(always)]
fn local_port(sk: u64, o: &KernelOffsets) -> u16 {
    u16::from_be(flow::read_kernel(sk, o.inet_sport))
}

/// The socket's addresses and ports as the `inet_sock_set_state` tracepoint's record gives them:
/// ports in host order; IPv4 from `inet_saddr`/`skc_daddr`, IPv6 from `skc_v6_rcv_saddr`/`skc_v6_daddr`.
#[inline(always)]
fn sock_tuple(sk: u64, o: &KernelOffsets) -> Tuple {
    let family: u16 = flow::read_kernel(sk, o.sock_family);
    let mut t = Tuple {
        family,
        sport: local_port(sk, o),
        dport: u16::from_be(flow::read_kernel(sk, o.sock_dport)),
        saddr: [0; 16],
        daddr: [0; 16],
    };
    if family == AF_INET6 {
        t.saddr = flow::read_kernel(sk, o.sock_v6_saddr);
        t.daddr = flow::read_kernel(sk, o.sock_v6_daddr);
    } else {
        let s: [u8; 4] = flow::read_kernel(sk, o.inet_saddr);
        let d: [u8; 4] = flow::read_kernel(sk, o.sock_daddr);
        t.saddr[..4].copy_from_slice(&s);
        t.daddr[..4].copy_from_slice(&d);
    }
    t
}

/// raw tracepoint `inet_sock_set_state` — `TP_PROTO(const struct sock *sk, const int oldstate,
/// const int newstate)` (checked against the kernel's BTF by a test), fired by
/// `inet_sk_set_state()`/`inet_sk_state_store()` on every state change of an inet socket (TCP,
/// SCTP, MPTCP: filter on the protocol). Counts state changes; a socket reaching `TCP_CLOSE` sends
/// its final state to user space through the ring buffer and leaves the map.
///
/// A raw tracepoint (see `agent_common::programs`): as a classic one it was skipped now and then
/// while the agent read its maps, and a flow whose connect was skipped was created at its first
/// ACK, its owner unknown and its handshake's retransmitted SYN taken for an earlier life's (one
/// retransmit short of `ss` under loss).
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn tf_inet_sock_set_state(ctx: RawTracePointContext) -> i32 {
    flow::count(counters::STATE_EVENTS);
    let Some(o) = flow::offsets() else {
        return 0;
    };
    let sk: u64 = ctx.arg(0);
    let protocol: u16 = flow::read_kernel(sk, o.sock_protocol);
    if protocol != IPPROTO_TCP {
        return 0;
    }
    // Raw arguments are the C values zero-extended to 64 bits.
    let oldstate = ctx.arg::<u64>(1) as u32 as i32;
    let newstate = ctx.arg::<u64>(2) as u32 as i32;
    // Listening sockets are not flows (CLOSE→LISTEN, LISTEN→CLOSE). A socket accepted from one is
    // born as a clone in LISTEN and moved to SYN_RECV: that is the new flow's first transition.
    if newstate == TCP_LISTEN as i32
        || (oldstate == TCP_LISTEN as i32 && newstate == TCP_CLOSE as i32)
    {
        return 0;
    }
    let flow = match flow::lookup(sk) {
        Lookup::Tracked(f) => f,
        Lookup::Ignored => {
            if newstate == TCP_CLOSE as i32 {
                let _ = FLOWS.remove(sk);
            }
            return 0;
        }
        Lookup::Missing if newstate == TCP_CLOSE as i32 => return 0,
        Lookup::Missing => {
            // connect() runs in the connecting process: the only transition whose `current` is the owner.
            let pid = if newstate == TCP_SYN_SENT as i32 {
                (bpf_get_current_pid_tgid() >> 32) as u32
            } else {
                0
            };
            match flow::create(sk, &sock_tuple(sk, o), pid, Creator::SetState) {
                Some(f) => f,
                None => return 0,
            }
        }
    };
    // SAFETY: as in `tf_tcp_probe`.
    let f = unsafe { &mut *flow };
    if f.sport == 0 {
        // connect() enters SYN_SENT before it picks the source port: take it from a later event.
        f.sport = local_port(sk, o);
    }
    // The state the socket leaves is not the last one this program recorded: a change came and
    // went unseen — a run the kernel skipped, or one it did not run and did not count (on the test
    // bed now and then a SYN_SENT → ESTABLISHED, which a classic tracepoint program on the same
    // event missed too). The old state says where it went: count that change and record the state.
    if f.state_changes > 0 && f.state != oldstate as u32 {
        f.state_changes += 1;
        if (0..32).contains(&oldstate) {
            f.states_seen |= 1 << oldstate;
        }
        flow::count(counters::STATES_INFERRED);
    }
    f.state_changes += 1;
    f.state = newstate as u32;
    if (0..32).contains(&newstate) {
        f.states_seen |= 1 << newstate;
    }
    flow::sync_retrans(f);
    if newstate == TCP_CLOSE as i32 {
        if CLOSED
            .output::<agent_common::FlowState>(&*f, flow::closed_wakeup())
            .is_err()
        {
            flow::count(counters::CLOSED_DROPPED);
        }
        let _ = FLOWS.remove(sk);
    }
    0
}

/// raw tracepoint `sock_send_length` — `TP_PROTO(struct sock *sk, int ret, int flags)` (checked
/// against the kernel's BTF by a test), fired by `sock_sendmsg_nosec()` when a send on any socket
/// returns; `ret` is the bytes accepted (or a negative error). The first bytes a server sends after
/// a request arrived close that request: time from the request reaching the socket to the response
/// leaving the application, per local (listening) port. A raw tracepoint (see
/// `agent_common::programs`): a skipped send lost that request's sample.
#[raw_tracepoint(tracepoint = "sock_send_length")]
pub fn tf_sock_send_length(ctx: RawTracePointContext) -> i32 {
    let ret = ctx.arg::<u64>(1) as u32 as i32;
    if ret <= 0 {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    // Every send on the host comes here: the map lookup first, the socket read only for ours.
    if let Lookup::Tracked(flow) = flow::lookup_quiet(sk) {
        let Some(o) = flow::offsets() else {
            return 0;
        };
        let protocol: u16 = flow::read_kernel(sk, o.sock_protocol);
        // SAFETY: as in `tf_tcp_probe`; a racing sender on the same socket at worst ends the
        // request a moment early or late.
        let f = unsafe { &mut *flow };
        if protocol == IPPROTO_TCP && f.req_start_ns != 0 {
            let now = flow::now_ns();
            flow::record_latency(
                flow::Latency::Request,
                u32::from(f.sport),
                now.saturating_sub(f.req_start_ns),
            );
            f.req_start_ns = 0;
        }
    }
    0
}
