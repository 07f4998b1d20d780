//! Types shared by the kernel programs (`agent-ebpf`) and the user-space agent.
//! Everything here is `#[repr(C)]` with explicit padding and a size assertion, so both sides agree byte for byte.
#![no_std]

pub mod hist;
pub mod tracepoints;

pub use hist::{HIST_BUCKETS, bucket_index, rtt_sample_us};

/// Map names: the kernel declares them, user space looks them up; never repeat the strings.
pub mod maps {
    /// `LruHashMap<u64 /* struct sock * */, FlowState>`: per-flow state.
    pub const FLOWS: &str = "TF_FLOWS";
    /// `PerCpuArray<u64>`: capture counters, indexed by [`crate::counters`].
    pub const COUNTERS: &str = "TF_COUNTERS";
    /// `Array<Config>` with one entry: filters and kernel offsets written by user space before attach.
    pub const CONFIG: &str = "TF_CONFIG";
    /// `Array<u8>` with 65536 entries: non-zero marks a port to watch (used when `FILTER_PORTS` is set).
    pub const PORTS: &str = "TF_PORTS";
    /// `PerCpuHashMap<u32 /* local port */, LatencyHist>`: request latency of served connections,
    /// from request bytes arriving to the first response bytes sent.
    pub const REQ_LATENCY: &str = "TF_REQ_LAT";
    /// `PerCpuHashMap<u32 /* probe id = attach cookie */, LatencyHist>`: uprobe entry→return latency.
    pub const PROBE_LATENCY: &str = "TF_PROBE_LAT";
    /// `LpmTrie<[u8; 16], u8>`: remote networks to watch (IPv4 as ::ffff:a.b.c.d), with `FILTER_CIDR`.
    pub const CIDRS: &str = "TF_CIDRS";
    /// `RingBuf`: the final [`crate::FlowState`] of each TCP socket reaching `TCP_CLOSE`.
    pub const CLOSED: &str = "TF_CLOSED";
    /// `PerCpuArray<FlowState>`, one entry per creating program: where a new flow is built (larger
    /// than the BPF stack).
    pub const SCRATCH: &str = "TF_SCRATCH";
}

/// Program names (the Rust function names in `agent-ebpf`) and the tracepoints they attach to.
pub mod programs {
    /// The one classic tracepoint: (program, category, tracepoint). Classic tracepoint programs
    /// are skipped while the per-CPU `bpf_prog_active` guard is held — by another tracing program,
    /// or by any BPF map syscall on that CPU, the agent's own window reads included — and the
    /// kernel counts those runs as the program's `recursion_misses`. A skipped segment costs one
    /// RTT sample; the hooks whose events must not be lost are raw tracepoints.
    pub const TCP_PROBE: (&str, &str, &str) = ("tf_tcp_probe", "tcp", "tcp_probe");
    /// Raw tracepoints: (program, tracepoint). Their arguments are read by position (checked
    /// against the kernel's BTF by a test) and the socket's fields through [`crate::KernelOffsets`];
    /// the kernel skips a raw tracepoint program only when that same program is already running on
    /// the CPU.
    pub const TCP_RETRANSMIT: (&str, &str) = ("tf_tcp_retransmit_skb", "tcp_retransmit_skb");
    pub const SOCK_SET_STATE: (&str, &str) = ("tf_inet_sock_set_state", "inet_sock_set_state");
    /// `sock_send_length`: a served connection's first response bytes. (A tracepoint: this kernel
    /// refuses fentry programs, and it has no kprobes.)
    pub const SOCK_SEND: (&str, &str) = ("tf_sock_send_length", "sock_send_length");
    pub const TRACEPOINTS: [(&str, &str, &str); 1] = [TCP_PROBE];
    pub const RAW_TRACEPOINTS: [(&str, &str); 3] = [TCP_RETRANSMIT, SOCK_SET_STATE, SOCK_SEND];
    /// uprobe / uretprobe pair attached once per `--uprobe` target.
    pub const UPROBE_ENTRY: &str = "tf_uprobe_entry";
    pub const UPROBE_RETURN: &str = "tf_uprobe_return";
    /// uprobes on a `--span`'s start and end markers, paired by request id.
    pub const SPAN_START: &str = "tf_span_start";
    pub const SPAN_END: &str = "tf_span_end";
    /// Every program the agent always loads (uprobes only when asked for).
    pub const ALL: [&str; 4] = [TCP_PROBE.0, TCP_RETRANSMIT.0, SOCK_SET_STATE.0, SOCK_SEND.0];
}

/// Indices into the `TF_COUNTERS` per-CPU array.
pub mod counters {
    pub const PROBE_EVENTS: u32 = 0;
    pub const RETRANSMIT_EVENTS: u32 = 1;
    pub const STATE_EVENTS: u32 = 2;
    pub const FLOWS_CREATED: u32 = 3;
    /// The LRU map refused an insert: the flow's events are not counted.
    pub const FLOW_INSERT_FAILED: u32 = 4;
    /// The ring buffer was full: a flow-closed event was lost.
    pub const CLOSED_DROPPED: u32 = 5;
    /// Events of flows the filter excludes.
    pub const FILTERED_EVENTS: u32 = 6;
    /// Retransmits of sockets the agent was not tracking yet (opened before it started, silent since).
    pub const RETRANSMIT_UNTRACKED: u32 = 7;
    /// State changes of tracked flows that no run of the state-change program saw, recovered from
    /// the next one's old state.
    pub const STATES_INFERRED: u32 = 8;
    pub const COUNT: u32 = 9;
}

/// Capacity of the per-flow LRU map.
pub const MAX_FLOWS: u32 = 16384;
/// Size of the flow-closed ring buffer in bytes (a power of two, a multiple of the page size).
pub const CLOSED_RINGBUF_BYTES: u32 = 1 << 20;

/// `Config::flags` bits.
pub const FILTER_PORTS: u32 = 1;
pub const FILTER_NETNS: u32 = 1 << 1;
pub const FILTER_CGROUP: u32 = 1 << 2;
pub const FILTER_CIDR: u32 = 1 << 4;
/// `offsets` hold values read from the running kernel's BTF.
pub const OFFSETS_VALID: u32 = 1 << 3;

/// `FlowState::flags` bits.
/// The filter excludes this flow: its events are counted as filtered and otherwise ignored.
pub const FLOW_IGNORED: u16 = 1;
/// `last_snd_una` holds a value, so the next sample can count acknowledged bytes.
pub const FLOW_HAVE_UNA: u16 = 1 << 1;

pub const AF_INET: u16 = 2;
pub const AF_INET6: u16 = 10;
pub const IPPROTO_TCP: u16 = 6;
/// `include/net/tcp_states.h`.
pub const TCP_ESTABLISHED: u8 = 1;
pub const TCP_SYN_SENT: u8 = 2;
pub const TCP_CLOSE: u8 = 7;
pub const TCP_LISTEN: u8 = 10;

/// Field offsets inside kernel structures, read by user space from `/sys/kernel/btf/vmlinux`
/// (the agent's own CO-RE): the kernel programs follow pointers only through these.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `struct sock` → `__sk_common.skc_net` (a `struct net *`).
    pub sock_net: u32,
    /// `struct net` → `ns.inum` (the netns inode number, as in `/proc/PID/ns/net`).
    pub net_inum: u32,
    /// `struct sock` → `sk_cgrp_data.cgroup` (a `struct cgroup *`).
    pub sock_cgroup: u32,
    /// `struct cgroup` → `kn` (a `struct kernfs_node *`).
    pub cgroup_kn: u32,
    /// `struct kernfs_node` → `id` (the cgroup id, as `bpf_get_current_cgroup_id` reports).
    pub kernfs_id: u32,
    /// `struct sk_buff` → `cb` plus `struct tcp_skb_cb` → `tcp_gso_segs`: segments in a TCP skb.
    pub skb_gso_segs: u32,
    /// `struct tcp_sock` → `total_retrans` (a `u32`): the kernel's own count of retransmitted segments.
    pub tcp_total_retrans: u32,
    /// `struct sock` → `__sk_common.skc_family` (a `u16`).
    pub sock_family: u32,
    /// `struct sock` → `sk_protocol` (a `u16`).
    pub sock_protocol: u32,
    /// `struct sock` → `__sk_common.skc_dport` (a `__be16`: the remote port).
    pub sock_dport: u32,
    /// `struct sock` → `__sk_common.skc_daddr` (a `__be32`: the remote IPv4 address).
    pub sock_daddr: u32,
    /// `struct sock` → `__sk_common.skc_v6_rcv_saddr` (16 bytes: the local IPv6 address).
    pub sock_v6_saddr: u32,
    /// `struct sock` → `__sk_common.skc_v6_daddr` (16 bytes: the remote IPv6 address).
    pub sock_v6_daddr: u32,
    /// `struct inet_sock` → `inet_sport` (a `__be16`: the local port).
    pub inet_sport: u32,
    /// `struct inet_sock` → `inet_saddr` (a `__be32`: the local IPv4 address).
    pub inet_saddr: u32,
    pub _pad: u32,
}

/// Written by user space into `TF_CONFIG[0]` before the programs are attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Config {
    pub flags: u32,
    /// With `FILTER_NETNS`: watch only sockets in this network namespace (inode number).
    pub netns: u32,
    /// With `FILTER_CGROUP`: watch only sockets owned by this cgroup (id).
    pub cgroup_id: u64,
    pub offsets: KernelOffsets,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<Config>() == 88);

/// Per-flow state, cumulative since the flow was first seen; user space takes deltas.
/// Updates come from TCP paths that hold the socket lock, so one flow is never updated by two CPUs at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowState {
    /// The `struct sock *` this flow is keyed by (unique while the socket lives; the entry goes at close).
    pub sk: u64,
    /// The kernel's socket cookie (`sock_cookie` of `tcp:tcp_probe`); 0 until the first RTT sample.
    pub cookie: u64,
    pub first_seen_ns: u64,
    /// RTT samples: one per ACK that covered new data (seen at the socket's next `tcp_probe` event).
    pub rtt_samples: u64,
    /// Sum of those samples, µs.
    pub rtt_sum_us: u64,
    pub bytes_acked: u64,
    /// Retransmitted segments (what `ss`'s `retrans:…/total` and `TcpRetransSegs` count).
    pub retrans_segs: u64,
    /// Retransmitted skbs (one tracepoint event each; an skb may carry several segments).
    pub retrans_events: u64,
    pub state_changes: u64,
    /// Cgroup id of the owning socket (0 when unknown).
    pub cgroup_id: u64,
    /// Local and remote address; IPv4 uses the first 4 bytes.
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub family: u16,
    pub sport: u16,
    pub dport: u16,
    pub flags: u16,
    /// Network namespace inode number (0 when unknown).
    pub netns: u32,
    /// Process that opened the connection (known for `connect()`; 0 otherwise).
    pub pid: u32,
    pub last_srtt_us: u32,
    pub snd_cwnd: u32,
    /// `snd_nxt - snd_una` at the last sample.
    pub bytes_in_flight: u32,
    pub last_snd_una: u32,
    /// Current TCP state (`include/net/tcp_states.h`).
    pub state: u32,
    /// Bit `1 << state` for every TCP state the socket has entered since it was first seen.
    pub states_seen: u32,
    /// On a connection this host accepted: when request bytes arrived while no response was
    /// pending (0 = none pending). Cleared by the first response bytes sent.
    pub req_start_ns: u64,
    /// The socket's `total_retrans` when the flow was first seen: retransmits from before are not ours.
    pub retrans_base: u32,
    pub _pad: u32,
    /// RTT histogram: buckets from [`bucket_index`] of each sample in µs ([`hist::rtt_sample_us`]).
    pub rtt_hist: [u32; HIST_BUCKETS],
}
const _: () = assert!(core::mem::size_of::<FlowState>() == 168 + 4 * HIST_BUCKETS);

impl FlowState {
    pub const fn zeroed() -> Self {
        Self {
            sk: 0,
            cookie: 0,
            first_seen_ns: 0,
            rtt_samples: 0,
            rtt_sum_us: 0,
            bytes_acked: 0,
            retrans_segs: 0,
            retrans_events: 0,
            state_changes: 0,
            cgroup_id: 0,
            saddr: [0; 16],
            daddr: [0; 16],
            family: 0,
            sport: 0,
            dport: 0,
            flags: 0,
            netns: 0,
            pid: 0,
            last_srtt_us: 0,
            snd_cwnd: 0,
            bytes_in_flight: 0,
            last_snd_una: 0,
            state: 0,
            states_seen: 0,
            req_start_ns: 0,
            retrans_base: 0,
            _pad: 0,
            rtt_hist: [0; HIST_BUCKETS],
        }
    }
}

/// A latency histogram in µs (same buckets as RTT), per CPU: summed by user space.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencyHist {
    pub count: u64,
    pub sum_us: u64,
    pub hist: [u32; HIST_BUCKETS],
}
const _: () = assert!(core::mem::size_of::<LatencyHist>() == 16 + 4 * HIST_BUCKETS);

impl LatencyHist {
    pub const fn zeroed() -> Self {
        Self {
            count: 0,
            sum_us: 0,
            hist: [0; HIST_BUCKETS],
        }
    }
}

/// `TCP_SYN_RECV`: the first state of a connection accepted from a listener.
pub const TCP_SYN_RECV: u8 = 3;

/// The 16-byte form of an address in `TF_CIDRS`: IPv6 as is, IPv4 mapped to ::ffff:a.b.c.d.
pub const fn mapped_addr(family: u16, raw: &[u8; 16]) -> [u8; 16] {
    if family == AF_INET6 {
        return *raw;
    }
    [
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, raw[0], raw[1], raw[2], raw[3],
    ]
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data: repr(C), integer fields only, explicit padding, no invalid bit patterns.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::FlowState {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::LatencyHist {}
}
