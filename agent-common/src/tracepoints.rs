//! Field offsets of the tracepoint records the kernel programs read, copied from
//! `/sys/kernel/tracing/events/<sys>/<name>/format`. A test compares every entry with the running
//! kernel's format file, so a kernel that moves a field fails that test instead of a measurement.

/// One field the programs read: (name in the format file, byte offset, byte size).
pub type Field = (&'static str, usize, usize);

/// `tcp:tcp_probe` (`include/trace/events/tcp.h`), fired by `tcp_rcv_established()` for every incoming
/// segment on an established socket; carries the sender-side smoothed RTT.
/// ```text
/// field:__u8 saddr[28];        offset:8;   size:28;  (sockaddr_in or sockaddr_in6)
/// field:__u8 daddr[28];        offset:36;  size:28;
/// field:__u16 sport;           offset:64;  size:2;
/// field:__u16 dport;           offset:66;  size:2;
/// field:__u16 family;          offset:68;  size:2;
/// field:__u16 data_len;        offset:76;  size:2;  (payload bytes of the incoming segment)
/// field:__u32 snd_nxt;         offset:80;  size:4;
/// field:__u32 snd_una;         offset:84;  size:4;
/// field:__u32 snd_cwnd;        offset:88;  size:4;
/// field:__u32 srtt;            offset:100; size:4;  (µs: tp->srtt_us >> 3)
/// field:__u64 sock_cookie;     offset:112; size:8;
/// field:const void * skaddr;   offset:128; size:8;
/// ```
pub mod tcp_probe {
    pub const SADDR: usize = 8;
    pub const DADDR: usize = 36;
    pub const SPORT: usize = 64;
    pub const DPORT: usize = 66;
    pub const FAMILY: usize = 68;
    pub const DATA_LEN: usize = 76;
    pub const SND_NXT: usize = 80;
    pub const SND_UNA: usize = 84;
    pub const SND_CWND: usize = 88;
    pub const SRTT: usize = 100;
    pub const SOCK_COOKIE: usize = 112;
    pub const SKADDR: usize = 128;
    pub const FIELDS: [super::Field; 12] = [
        ("data_len", DATA_LEN, 2),
        ("saddr", SADDR, 28),
        ("daddr", DADDR, 28),
        ("sport", SPORT, 2),
        ("dport", DPORT, 2),
        ("family", FAMILY, 2),
        ("snd_nxt", SND_NXT, 4),
        ("snd_una", SND_UNA, 4),
        ("snd_cwnd", SND_CWND, 4),
        ("srtt", SRTT, 4),
        ("sock_cookie", SOCK_COOKIE, 8),
        ("skaddr", SKADDR, 8),
    ];
}
