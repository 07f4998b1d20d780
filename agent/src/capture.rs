//! Loads the kernel programs, configures and attaches them, and reads their maps. Dropping a
//! [`Capture`] detaches every program (the links are file descriptors: a killed agent detaches too).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use agent_common::{
    Config, FILTER_CGROUP, FILTER_CIDR, FILTER_NETNS, FILTER_PORTS, FlowState, LatencyHist,
    OFFSETS_VALID, counters, maps, programs,
};
use anyhow::{Context, Result, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, LpmTrie, MapData, PerCpuArray, PerCpuHashMap, RingBuf, lpm_trie::Key},
    programs::{
        RawTracePoint, TracePoint, UProbe,
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope},
    },
};
use tokio::io::unix::AsyncFd;

use crate::{
    btf_offsets,
    uprobe_target::{SpanSpec, UprobeSpec},
    window::Counters,
};

/// `--uprobe` and `--span` targets together: the size of the kernel's probe latency map.
pub const MAX_PROBES: usize = 256;

/// The compiled kernel programs, embedded at build time by `build.rs` (aya-build).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tokenflow"));

/// Which flows to watch; empty filters watch everything.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Watch flows whose local or remote port is one of these.
    pub ports: Vec<u16>,
    /// Watch only sockets in this network namespace (inode number).
    pub netns: Option<u32>,
    /// Watch only sockets owned by this cgroup (id).
    pub cgroup_id: Option<u64>,
    /// Watch only flows whose remote address lies in one of these networks.
    pub cidrs: Vec<ipnet::IpNet>,
}

pub struct Capture {
    // Owns the programs and their links: dropping it detaches everything.
    ebpf: Ebpf,
    flows: HashMap<MapData, u64, FlowState>,
    counters: PerCpuArray<MapData, u64>,
    closed: AsyncFd<RingBuf<MapData>>,
    /// Flows closed since the last snapshot, drained from the ring buffer as they arrive.
    closed_flows: Vec<FlowState>,
    req_lat: PerCpuHashMap<MapData, u32, LatencyHist>,
    probe_lat: PerCpuHashMap<MapData, u32, LatencyHist>,
}

/// Cumulative kernel state at one instant (see `window::Snapshot`).
pub struct KernelState {
    pub live: Vec<FlowState>,
    pub closed: Vec<FlowState>,
    pub counters: Counters,
    /// Cumulative request latency per local port, summed over CPUs.
    pub req_lat: BTreeMap<u32, LatencyHist>,
    /// Cumulative uprobe latency per probe id, summed over CPUs.
    pub probe_lat: BTreeMap<u32, LatencyHist>,
    /// Runs of the loaded programs the kernel skipped, in all.
    pub skipped_runs: u64,
}

impl Capture {
    /// Loads and attaches the programs. Needs root, or CAP_BPF + CAP_PERFMON + CAP_NET_ADMIN.
    /// Probe ids (the windows' `uprobes` order): `uprobes` first, then `spans`.
    pub fn start(
        filter: &Filter,
        btf: &Path,
        uprobes: &[UprobeSpec],
        spans: &[SpanSpec],
    ) -> Result<Self> {
        ensure_tracefs()?;
        let mut ebpf = Ebpf::load(EBPF_OBJECT).map_err(|e| privilege_hint(e.into()))?;

        // The raw tracepoint programs read the socket through these: without them they would see
        // no state change and no response, so no BTF is an error, not a degraded mode.
        let offsets = btf_offsets::kernel_offsets(btf).context(
            "the kernel programs read sockets at offsets from the kernel's BTF \
             (CONFIG_DEBUG_INFO_BTF=y, or point --btf at a vmlinux BTF file)",
        )?;
        let mut cfg = Config {
            flags: OFFSETS_VALID,
            offsets,
            ..Config::default()
        };
        if !filter.ports.is_empty() {
            cfg.flags |= FILTER_PORTS;
            let mut ports: Array<_, u8> = Array::try_from(map(&mut ebpf, maps::PORTS)?)?;
            for &p in &filter.ports {
                ports
                    .set(u32::from(p), 1, 0)
                    .context("writing the port filter")?;
            }
        }
        if !filter.cidrs.is_empty() {
            cfg.flags |= FILTER_CIDR;
            let mut trie: LpmTrie<_, [u8; 16], u8> =
                LpmTrie::try_from(map(&mut ebpf, maps::CIDRS)?)?;
            for net in &filter.cidrs {
                let (bits, data) = match net {
                    ipnet::IpNet::V4(n) => (
                        96 + u32::from(n.prefix_len()),
                        n.network().to_ipv6_mapped().octets(),
                    ),
                    ipnet::IpNet::V6(n) => (u32::from(n.prefix_len()), n.network().octets()),
                };
                trie.insert(&Key::new(bits, data), 1, 0)
                    .with_context(|| format!("adding {net} to the CIDR filter"))?;
            }
        }
        if let Some(ns) = filter.netns {
            cfg.flags |= FILTER_NETNS;
            cfg.netns = ns;
        }
        if let Some(id) = filter.cgroup_id {
            cfg.flags |= FILTER_CGROUP;
            cfg.cgroup_id = id;
        }
        let mut config: Array<_, Config> = Array::try_from(map(&mut ebpf, maps::CONFIG)?)?;
        config
            .set(0, cfg, 0)
            .context("writing the capture config")?;

        for (prog, tracepoint) in programs::RAW_TRACEPOINTS {
            let p: &mut RawTracePoint = program(&mut ebpf, prog)?;
            p.load()
                .with_context(|| format!("verifier rejected {prog}"))?;
            p.attach(tracepoint)
                .with_context(|| format!("attaching {prog} to raw tracepoint {tracepoint}"))?;
        }
        for (prog, category, tracepoint) in programs::TRACEPOINTS {
            let p: &mut TracePoint = program(&mut ebpf, prog)?;
            p.load()
                .with_context(|| format!("verifier rejected {prog}"))?;
            p.attach(category, tracepoint)
                .with_context(|| format!("attaching {prog} to {category}:{tracepoint}"))?;
        }

        let points = resolve(uprobes.iter().zip(0..))?;
        for prog in [programs::UPROBE_ENTRY, programs::UPROBE_RETURN] {
            attach_points(&mut ebpf, prog, &points)?;
        }
        let markers: Vec<[UprobeSpec; 2]> = spans.iter().map(SpanSpec::markers).collect();
        let first = uprobes.len();
        let starts = resolve(markers.iter().map(|[a, _]| a).zip(first..))?;
        let ends = resolve(markers.iter().map(|[_, b]| b).zip(first..))?;
        attach_points(&mut ebpf, programs::SPAN_START, &starts)?;
        attach_points(&mut ebpf, programs::SPAN_END, &ends)?;

        let flows = HashMap::try_from(take(&mut ebpf, maps::FLOWS)?)?;
        let req_lat = PerCpuHashMap::try_from(take(&mut ebpf, maps::REQ_LATENCY)?)?;
        let probe_lat = PerCpuHashMap::try_from(take(&mut ebpf, maps::PROBE_LATENCY)?)?;
        let counters = PerCpuArray::try_from(take(&mut ebpf, maps::COUNTERS)?)?;
        let ring = RingBuf::try_from(take(&mut ebpf, maps::CLOSED)?)?;
        // SAFETY: the RingBuf owns its map fd and keeps it open for as long as the AsyncFd holds it.
        let closed =
            unsafe { AsyncFd::register(ring) }.context("registering the ring buffer with tokio")?;
        Ok(Self {
            ebpf,
            flows,
            counters,
            closed,
            closed_flows: Vec::new(),
            req_lat,
            probe_lat,
        })
    }

    /// Waits until the ring buffer has flow-closed events and moves them into the pending list.
    pub async fn drain_closed(&mut self) -> Result<()> {
        let mut guard = self.closed.readable_mut().await?;
        drain_ring(guard.get_inner_mut(), &mut self.closed_flows);
        guard.clear_ready();
        Ok(())
    }

    /// Reads the whole cumulative state; the closed flows gathered so far move into it.
    pub fn snapshot(&mut self) -> Result<KernelState> {
        // Anything queued but not yet woken for.
        drain_ring(self.closed.get_mut(), &mut self.closed_flows);
        let mut live = Vec::new();
        for entry in self.flows.iter() {
            match entry {
                Ok((_, flow)) if flow.flags & agent_common::FLOW_IGNORED == 0 => live.push(flow),
                Ok(_) => {}
                // The flow closed between listing its key and reading it.
                Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e).context("reading the flow map"),
            }
        }
        let mut counters = [0u64; counters::COUNT as usize];
        for (i, c) in counters.iter_mut().enumerate() {
            *c = self.counters.get(&(i as u32), 0)?.iter().sum();
        }
        let mut skipped_runs = 0;
        for (name, p) in self.ebpf.programs() {
            // Programs not loaded (no uprobe asked for) have no fd and no runs.
            if let Ok(fd) = p.fd() {
                // A count that cannot be read is not worth the window: it reads as none.
                match skipped(std::os::fd::AsFd::as_fd(fd)) {
                    Ok(n) => skipped_runs += n,
                    Err(e) => tracing::warn!(program = name, "reading its skipped runs: {e:#}"),
                }
            }
        }
        Ok(KernelState {
            live,
            closed: std::mem::take(&mut self.closed_flows),
            counters,
            req_lat: sum_per_cpu(&self.req_lat)?,
            probe_lat: sum_per_cpu(&self.probe_lat)?,
            skipped_runs,
        })
    }
}

/// Runs of a loaded program the kernel skipped rather than nest it (`recursion_misses` in the
/// program's fdinfo, as bpftool shows it; absent before Linux 5.12: none counted).
fn skipped(fd: std::os::fd::BorrowedFd<'_>) -> Result<u64> {
    use std::os::fd::AsRawFd;
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{}", fd.as_raw_fd()))?;
    Ok(info
        .lines()
        .find_map(|l| l.strip_prefix("recursion_misses:"))
        .map(|v| v.trim().parse::<u64>())
        .transpose()?
        .unwrap_or(0))
}

/// Sums a per-CPU latency map into one histogram per key.
fn sum_per_cpu(
    map: &PerCpuHashMap<MapData, u32, LatencyHist>,
) -> Result<BTreeMap<u32, LatencyHist>> {
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        let (key, per_cpu) = entry.context("reading a latency map")?;
        let acc = out.entry(key).or_insert_with(LatencyHist::zeroed);
        for h in per_cpu.iter() {
            acc.count += h.count;
            acc.sum_us += h.sum_us;
            for (a, b) in acc.hist.iter_mut().zip(h.hist.iter()) {
                *a += b;
            }
        }
    }
    Ok(out)
}

/// Attaches the entry/return pair once per target; the probe id (index) travels as the BPF cookie.
/// Moves every flow-closed record out of the ring buffer (each is one whole `FlowState`).
fn drain_ring(ring: &mut RingBuf<MapData>, out: &mut Vec<FlowState>) {
    while let Some(item) = ring.next() {
        if item.len() >= std::mem::size_of::<FlowState>() {
            // SAFETY: the kernel wrote a whole FlowState (size checked); read_unaligned copies it out.
            out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast::<FlowState>()) });
        }
    }
}

/// A program of the object, as its concrete type, with an error that names it.
fn program<'a, T>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut T>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let p = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the eBPF object"))?;
    <&mut T>::try_from(p).with_context(|| format!("program {name} is not of the expected type"))
}

/// A function to attach a uprobe program to: the binary, the symbol as stored in it, and the probe
/// id the program records under (its BPF cookie).
struct Point {
    path: PathBuf,
    symbol: String,
    id: usize,
}

/// Looks every target's symbol up in its binary (each ELF file read once per target).
fn resolve<'a>(targets: impl Iterator<Item = (&'a UprobeSpec, usize)>) -> Result<Vec<Point>> {
    targets
        .map(|(spec, id)| {
            Ok(Point {
                path: spec.path.clone(),
                symbol: crate::uprobe_target::resolve(spec)?,
                id,
            })
        })
        .collect()
}

/// Loads uprobe program `prog` and attaches it at every point (nothing when there are none).
fn attach_points(ebpf: &mut Ebpf, prog: &str, points: &[Point]) -> Result<()> {
    if points.is_empty() {
        return Ok(());
    }
    let p: &mut UProbe = program(ebpf, prog)?;
    p.load()
        .with_context(|| format!("verifier rejected {prog}"))?;
    for pt in points {
        let point = UProbeAttachPoint {
            location: UProbeAttachLocation::Symbol(&pt.symbol),
            cookie: Some(pt.id as u64),
        };
        p.attach(point, &pt.path, UProbeScope::AllProcesses)
            .with_context(|| format!("attaching {prog} to {}:{}", pt.path.display(), pt.symbol))?;
    }
    Ok(())
}

fn map<'a>(ebpf: &'a mut Ebpf, name: &str) -> Result<&'a mut aya::maps::Map> {
    ebpf.map_mut(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

fn take(ebpf: &mut Ebpf, name: &str) -> Result<aya::maps::Map> {
    ebpf.take_map(name)
        .with_context(|| format!("map {name} missing from the eBPF object"))
}

/// aya attaches tracepoints through tracefs; a fresh machine may not have it mounted.
fn ensure_tracefs() -> Result<()> {
    let dir = PathBuf::from("/sys/kernel/tracing");
    if dir.join("events").exists() || Path::new("/sys/kernel/debug/tracing/events").exists() {
        return Ok(());
    }
    nix::mount::mount(
        Some("tracefs"),
        &dir,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context(
        "tracefs is not mounted and mounting it failed; run: mount -t tracefs tracefs /sys/kernel/tracing",
    )
}

fn privilege_hint(e: anyhow::Error) -> anyhow::Error {
    let text = format!("{e:#}");
    if text.contains("Operation not permitted") || text.contains("EPERM") {
        e.context(
            "loading eBPF programs needs root: run with sudo, or grant CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN",
        )
    } else {
        e.context("loading the eBPF object")
    }
}

/// Fails early, with the fix, when the process lacks the capabilities the kernel will demand.
pub fn check_privileges() -> Result<()> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| eff & (1u64 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON) && has(CAP_NET_ADMIN)) {
        return Ok(());
    }
    bail!(
        "tokenflow-agent needs privileges to load eBPF programs: run it with sudo, or grant \
         CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN (e.g. sudo setcap cap_bpf,cap_perfmon,cap_net_admin+ep $(which tokenflow-agent))"
    )
}
