//! Kernel TCP capture against the kernel's own counters, on real sockets in network namespaces.
//! Each test builds its own client—router—server test bed and removes it afterwards.

use std::{
    net::{SocketAddr, SocketAddrV4},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use tokenflow_schema::{FlowWindow, TelemetryWindow};
use tokenflow_testbed::{
    CLIENT_ADDR, SERVER_ADDR, Testbed,
    traffic::{DiscardServer, connect_from, send_paced, wait_acked},
};
use tokenflow_tests::{agent::Agent, bpf::Misses, privileged, ss};

fn server(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(SERVER_ADDR, port))
}

/// Agent watching only the client namespace and one port.
fn agent_for(bed: &Testbed, port: u16) -> Result<Agent> {
    let netns = format!("/run/netns/{}", bed.client);
    Agent::start(&[
        "--interval",
        "1s",
        "--netns",
        &netns,
        "--port",
        &port.to_string(),
    ])
}

/// A test bed named `name` with a discard server on `port` in the server namespace and an agent
/// watching that port from the client namespace.
fn bed_with_server(name: &str, port: u16) -> Result<(Testbed, DiscardServer, Agent)> {
    let bed = Testbed::create(name)?;
    let srv = DiscardServer::start(&bed.server, server(port))?;
    let agent = agent_for(&bed, port)?;
    Ok((bed, srv, agent))
}

/// Every window entry of the client flow with this local port.
fn flow_entries(windows: &[TelemetryWindow], local_port: u16) -> Vec<FlowWindow> {
    let local = format!("{CLIENT_ADDR}:{local_port}");
    windows
        .iter()
        .flat_map(|w| w.flows.iter().filter(|f| f.local == local).cloned())
        .collect()
}

#[test]
fn rtt_agrees_with_ss_at_20_and_80_ms() -> Result<()> {
    let Some(_lock) = privileged("rtt_agrees_with_ss") else {
        return Ok(());
    };
    for delay_ms in [20u64, 80] {
        let (mut bed, _srv, agent) = bed_with_server("rtt", 5201)?;
        bed.set_delay(Duration::from_millis(delay_ms))?;
        let mut stream = connect_from(&bed.client, server(5201))?;
        let port = stream.local_addr()?.port();
        // App-limited (200 KB/s), so the only queue is the fixed delay: RTT is the path's.
        send_paced(&mut stream, 200_000, 2_000, Duration::from_secs(4))?;
        let ss = ss::sockets(&bed.client, &SERVER_ADDR.to_string())?
            .into_iter()
            .find(|s| s.local_port == port)
            .context("ss does not show the test socket")?;
        let seen = agent.windows().len();
        let windows = agent.wait_windows(seen + 1, Duration::from_secs(5))?;
        let flows = flow_entries(&windows, port);
        let last = flows
            .iter()
            .rev()
            .find(|f| f.rtt.samples >= 5)
            .with_context(|| format!("no window with RTT samples for port {port}: {windows:#?}"))?;
        // `ss` shows the kernel's smoothed RTT, an average of the samples: against the agent's
        // mean of them (its median is lower where the receiver's delayed ACKs lift some samples:
        // 19.5 ms vs ss's 24.8 on the 20 ms path).
        let agent_ms = last.rtt.mean_us as f64 / 1000.0;
        eprintln!(
            "delay {delay_ms} ms: agent mean {agent_ms:.2} ms, p50 {:.2} ms ({} samples), ss rtt {:.2} ms",
            last.rtt.p50_us as f64 / 1000.0,
            last.rtt.samples,
            ss.rtt_ms
        );
        assert!(
            ss.rtt_ms >= delay_ms as f64,
            "delay line not in the path: ss rtt {} ms",
            ss.rtt_ms
        );
        let err = (agent_ms - ss.rtt_ms).abs() / ss.rtt_ms;
        assert!(
            err <= 0.20,
            "agent mean {agent_ms} ms vs ss {} ms: {:.1} % apart",
            ss.rtt_ms,
            err * 100.0
        );
        assert!(last.cookie != 0, "tcp_probe carries the socket cookie");
    }
    Ok(())
}

/// The histogram holds each RTT sample, not the kernel's smoothed estimate, which moves an eighth of
/// the way to each: a flow of a few requests a second would show a queue for seconds after it went,
/// and a short one not at all. A probe pings every 100 ms over a 20 ms path that becomes 80 ms for
/// 1.2 s: the agent's samples of 75 ms and over number what the probe measured (the smoothed
/// estimate climbs 20 → 68 ms over those twelve samples and never gets there).
#[test]
fn rtt_samples_follow_the_path_not_the_smoothed_estimate() -> Result<()> {
    let Some(_lock) = privileged("rtt_samples_not_smoothed") else {
        return Ok(());
    };
    let mut bed = Testbed::create("rtts")?;
    // The line delays one direction only: the round trip is this plus a fraction of a millisecond.
    bed.set_delay(Duration::from_millis(20))?;
    let agent = agent_for(&bed, 5207)?;
    let probe = tokenflow_testbed::traffic::EchoProbe::start(
        &bed.client,
        &bed.server,
        server(5207),
        Duration::from_millis(100),
    )?;
    std::thread::sleep(Duration::from_secs(2));
    bed.set_delay(Duration::from_millis(80))?;
    std::thread::sleep(Duration::from_millis(1200));
    bed.set_delay(Duration::from_millis(20))?;
    std::thread::sleep(Duration::from_secs(2));
    let echoes = probe.samples();
    drop(probe);
    let seen = agent.windows().len();
    let windows = agent.wait_windows(seen + 2, Duration::from_secs(5))?;
    let remote = format!("{SERVER_ADDR}:5207");
    let hist: Vec<[u64; 3]> = windows
        .iter()
        .flat_map(|w| w.flows.iter())
        .filter(|f| f.remote == remote)
        .flat_map(|f| f.rtt_hist.iter().copied())
        .collect();
    let count = |keep: &dyn Fn(u64) -> bool| -> u64 {
        hist.iter().filter(|b| keep(b[0])).map(|b| b[2]).sum()
    };
    // From the bucket that holds 75 ms up.
    let agent_high = count(&|lo| lo >= 73_728);
    let agent_all = count(&|_| true);
    // The delay changes without loss (`set_delay` retunes the line), so no ping should be
    // retransmitted; one that was would read long in the probe (from its first write) while the
    // kernel's sample, if any, is of the retransmission: such pings are counted apart.
    let long = echoes.iter().filter(|(_, ms)| *ms >= 150.0).count() as u64;
    let high = echoes
        .iter()
        .filter(|(_, ms)| (75.0..150.0).contains(ms))
        .count() as u64;
    let all = echoes.len() as u64;
    eprintln!(
        "probe: {all} round trips, {high} of 75–150 ms, {long} longer; agent: {agent_all} samples, \
         {agent_high} of 75 ms or more"
    );
    assert!(
        high >= 8,
        "the 80 ms phase did not show in the probe: {echoes:?}"
    );
    assert!(
        agent_high + 2 >= high && agent_high <= high + long + 2,
        "agent {agent_high} samples of 75 ms or more, probe {high} (+{long} retransmitted): {hist:?}"
    );
    assert!(
        agent_all.abs_diff(all) <= 5,
        "agent {agent_all} samples, probe {all} round trips: {hist:?}"
    );
    Ok(())
}

/// tcp_probe fires on every segment a socket receives, but the kernel only takes an RTT sample when
/// an ACK covers new data. A server socket that only receives (an upload) must report no RTT
/// samples — repeating its handshake-time srtt once per incoming segment would put a stale figure in
/// every window, weighted by the upload's size.
#[test]
fn a_socket_that_only_receives_reports_no_rtt_samples() -> Result<()> {
    let Some(_lock) = privileged("receive_only_no_rtt") else {
        return Ok(());
    };
    let mut bed = Testbed::create("rxonly")?;
    bed.set_delay(Duration::from_millis(20))?;
    let srv = DiscardServer::start(&bed.server, server(5206))?;
    let netns = format!("/run/netns/{}", bed.server);
    let agent = Agent::start(&["--interval", "1s", "--netns", &netns, "--port", "5206"])?;
    let mut stream = connect_from(&bed.client, server(5206))?;
    send_paced(&mut stream, 200_000, 2_000, Duration::from_secs(3))?;
    wait_acked(&stream, Duration::from_secs(10))?;
    let seen = agent.windows().len();
    let windows = agent.wait_windows(seen + 1, Duration::from_secs(5))?;
    let local = format!("{SERVER_ADDR}:5206");
    let flows: Vec<FlowWindow> = windows
        .iter()
        .flat_map(|w| w.flows.iter().filter(|f| f.local == local).cloned())
        .collect();
    let received = srv.received.load(std::sync::atomic::Ordering::Relaxed);
    let samples: u64 = flows.iter().map(|f| f.rtt.samples).sum();
    eprintln!(
        "server socket: {} window entries, {received} bytes received, {samples} RTT samples",
        flows.len()
    );
    assert!(
        received >= 500_000,
        "the upload did not reach the server: {received} bytes"
    );
    assert!(
        flows.iter().any(|f| f.cookie != 0),
        "tcp_probe never saw the receiving socket: {windows:#?}"
    );
    assert_eq!(
        samples, 0,
        "a socket that sent no data reported RTT samples: {flows:#?}"
    );
    drop(stream);
    Ok(())
}

#[test]
fn retransmits_equal_kernel_total_retrans_under_5_percent_loss() -> Result<()> {
    let Some(_lock) = privileged("retransmits_equal_kernel") else {
        return Ok(());
    };
    let bed = Testbed::create("loss")?;
    bed.set_loss(50, 5202)?;
    let _srv = DiscardServer::start(&bed.server, server(5202))?;
    let mut agent = agent_for(&bed, 5202)?;
    let mut stream = connect_from(&bed.client, server(5202))?;
    let port = stream.local_addr()?.port();
    send_paced(&mut stream, 2_000_000, 16_384, Duration::from_secs(4))?;
    wait_acked(&stream, Duration::from_secs(30))?;
    let kernel = ss::sockets(&bed.client, &SERVER_ADDR.to_string())?
        .into_iter()
        .find(|s| s.local_port == port)
        .context("ss does not show the test socket")?
        .total_retrans;
    // Two more windows so the agent has read the map after the last retransmit; stop before close,
    // so a lost FIN cannot add a retransmit the oracle did not count.
    let seen = agent.windows().len();
    agent.wait_windows(seen + 2, Duration::from_secs(5))?;
    agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(5))?;
    let ours: u64 = flow_entries(&agent.windows(), port)
        .iter()
        .map(|f| f.retransmits)
        .sum();
    eprintln!("retransmitted segments: agent {ours}, kernel total_retrans {kernel}");
    assert!(
        kernel > 0,
        "5 % loss produced no retransmit: the loss rule is not in the path"
    );
    assert_eq!(ours, kernel);
    drop(stream);
    Ok(())
}

#[test]
fn connect_and_close_show_every_state_transition() -> Result<()> {
    let Some(_lock) = privileged("connect_and_close") else {
        return Ok(());
    };
    let (bed, _srv, agent) = bed_with_server("state", 5203)?;
    let mut stream = connect_from(&bed.client, server(5203))?;
    let port = stream.local_addr()?.port();
    send_paced(&mut stream, 100_000, 1_000, Duration::from_millis(300))?;
    drop(stream);
    let seen = agent.windows().len();
    let windows = agent.wait_windows(seen + 2, Duration::from_secs(5))?;
    let flows = flow_entries(&windows, port);
    let last = flows
        .last()
        .context("the closed flow is missing from the windows")?;
    eprintln!("states seen: {:?}, final {}", last.states_seen, last.state);
    assert!(last.closed);
    assert_eq!(last.state, "CLOSE");
    assert_eq!(
        last.states_seen,
        ["ESTABLISHED", "SYN_SENT", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]
    );
    let changes: u64 = flows.iter().map(|f| f.state_changes).sum();
    assert_eq!(
        changes, 5,
        "SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, CLOSE"
    );
    assert_eq!(
        last.pid,
        std::process::id(),
        "connect() ran in this test process"
    );
    Ok(())
}

/// connect() enters SYN_SENT before it picks the source port: a flow is held back from the windows
/// until its port is known — at its establishment, or here, where every SYN is dropped, at its
/// SYN's first retransmission (about 1 s): never shown with local port 0, and not hidden until
/// connect() gives up.
#[test]
fn a_connection_whose_syn_goes_unanswered_shows_its_port_after_the_first_retransmission()
-> Result<()> {
    let Some(_lock) = privileged("unanswered_syn") else {
        return Ok(());
    };
    let bed = Testbed::create("synloss")?;
    bed.set_loss(1000, 5214)?;
    let agent = agent_for(&bed, 5214)?;
    let client = bed.client.clone();
    let connecting = std::thread::spawn(move || connect_from(&client, server(5214)).is_err());
    let remote = format!("{SERVER_ADDR}:5214");
    let t0 = Instant::now();
    let shown = loop {
        let windows = agent.windows();
        let flows: Vec<FlowWindow> = windows
            .iter()
            .flat_map(|w| w.flows.iter().filter(|f| f.remote == remote).cloned())
            .collect();
        if let Some(f) = flows.iter().find(|f| f.retransmits > 0) {
            break Some((f.clone(), flows));
        }
        if t0.elapsed() > Duration::from_secs(4) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        connecting.join().expect("connect thread panicked"),
        "a connect through a link that drops every SYN succeeded"
    );
    let (flow, all) = shown.context("the connection was not shown within 4 s")?;
    assert_eq!(flow.state, "SYN_SENT");
    assert!(
        all.iter().all(|f| !f.local.ends_with(":0")),
        "shown with local port 0: {all:?}"
    );
    Ok(())
}

/// A state change that no run of the program saw is recovered from the next change, which names
/// the state the socket leaves. Seen in the map-read stress test below now and then: a connection's
/// SYN_SENT → ESTABLISHED went unrecorded by the agent's raw program with no skip counted, and a
/// classic tracepoint program bpftrace had on the same event missed it too, while its log showed
/// the connection's next change leaving ESTABLISHED. Here the test makes the gap itself: once the
/// connection is established it sets the flow's entry back to what it held in SYN_SENT, as if
/// ESTABLISHED had gone unseen, and closes it.
#[test]
fn a_state_change_no_run_saw_is_recovered_from_the_next_one() -> Result<()> {
    use agent_common::{FlowState, TCP_SYN_SENT};
    use aya::maps::{HashMap, Map, MapData, loaded_maps};
    let Some(_lock) = privileged("state_change_recovered") else {
        return Ok(());
    };
    let (bed, _srv, agent) = bed_with_server("unseen", 5213)?;
    let mut stream = connect_from(&bed.client, server(5213))?;
    let port = stream.local_addr()?.port();
    send_paced(&mut stream, 20_000, 1_000, Duration::from_millis(100))?;
    let flows_map = loaded_maps()
        .filter_map(Result::ok)
        .find(|m| m.name_as_str() == Some(agent_common::maps::FLOWS))
        .context("the agent's flow map is not loaded")?
        .id();
    let mut flows: HashMap<_, u64, FlowState> =
        HashMap::try_from(Map::from_map_data(MapData::from_id(flows_map)?)?)?;
    let (sk, mut flow) = flows
        .iter()
        .filter_map(Result::ok)
        .find(|(_, f)| f.sport == port && f.dport == 5213)
        .context("the connection's flow is not in the map")?;
    assert_eq!(flow.state_changes, 2, "SYN_SENT and ESTABLISHED recorded");
    flow.state = TCP_SYN_SENT as u32;
    flow.states_seen = 1 << TCP_SYN_SENT;
    flow.state_changes = 1;
    flows.insert(sk, flow, 0)?;
    drop(stream);
    let seen = agent.windows().len();
    let windows = agent.wait_windows(seen + 2, Duration::from_secs(5))?;
    let entries = flow_entries(&windows, port);
    let last = entries
        .last()
        .context("the closed flow is missing from the windows")?;
    assert!(last.closed);
    assert_eq!(
        last.states_seen,
        ["ESTABLISHED", "SYN_SENT", "FIN_WAIT1", "FIN_WAIT2", "CLOSE"]
    );
    // (The windows' summed state changes would depend on whether a window read the entry
    // between its rewrite and the close: a count going back reads as no change.)
    let inferred: u64 = windows.iter().map(|w| w.capture.states_inferred).sum();
    assert_eq!(inferred, 1, "the unseen change counted once");
    Ok(())
}

/// The agent's state changes, retransmits and sends are raw tracepoints because classic tracepoint
/// programs are skipped while any BPF map syscall runs on the CPU (the per-CPU `bpf_prog_active`
/// guard): a timer's softirq delivering a segment in the middle of the agent's own map reads lost
/// the event. Here threads read a map on every CPU without pause while connections open, lose
/// segments behind a tbf bottleneck (delivered from its timer) and close. `tcp_probe`, the one
/// classic tracepoint left, misses runs — the stress works — while the raw programs miss at most
/// the few runs in which one interrupts itself (counted by the kernel), and every connection shows
/// its whole life — connect with its owner, five states, close — but for those counted runs.
#[test]
fn map_reads_on_every_cpu_skip_no_state_change_or_retransmit() -> Result<()> {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use aya::maps::{Map, MapData, PerCpuArray, loaded_maps};
    let Some(_lock) = privileged("map_reads_skip_nothing") else {
        return Ok(());
    };
    let bed = Testbed::create("miss")?;
    // Slower than the senders: segments queue in tbf and leave from its timer, in softirq on
    // whichever CPU the timer interrupts.
    bed.set_bottleneck(2_000, Duration::from_secs(1))?;
    bed.set_loss(100, 5208)?;
    let _srv = DiscardServer::start(&bed.server, server(5208))?;
    let mut agent = agent_for(&bed, 5208)?;
    let before = Misses::now()?;
    // The agent's scratch flow: every read copies one FlowState per CPU, a long stretch with
    // the guard held.
    let scratch = loaded_maps()
        .filter_map(Result::ok)
        .find(|m| m.name_as_str() == Some(agent_common::maps::SCRATCH))
        .context("the agent's scratch map is not loaded")?
        .id();
    let stop = Arc::new(AtomicBool::new(false));
    let cpus = std::thread::available_parallelism()?.get();
    let readers: Vec<_> = (0..cpus)
        .map(|cpu| {
            let stop = stop.clone();
            std::thread::spawn(move || -> Result<u64> {
                let mut set = nix::sched::CpuSet::new();
                set.set(cpu)?;
                nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)?;
                let map = Map::from_map_data(MapData::from_id(scratch)?)?;
                let array: PerCpuArray<_, [u8; size_of::<agent_common::FlowState>()]> =
                    PerCpuArray::try_from(map)?;
                let mut reads = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    array.get(&0, 0)?;
                    reads += 1;
                }
                Ok(reads)
            })
        })
        .collect();
    // Sixty connections each write 8 KB and close at once: their data and FINs queue in tbf, so
    // the handshakes' and closes' replies reach the client from its timer.
    let mut streams = Vec::new();
    for _ in 0..60 {
        let mut stream = connect_from(&bed.client, server(5208))?;
        std::io::Write::write_all(&mut stream, &[0x5a; 8_192])?;
        streams.push(stream);
    }
    let ports: Vec<u16> = streams
        .iter()
        .map(|s| s.local_addr().map(|a| a.port()))
        .collect::<std::io::Result<_>>()?;
    drop(streams);
    // Until every connection shows its close, or 30 s (a skipped close never arrives: accounted
    // for below).
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(30) {
        let windows = agent.windows();
        if ports
            .iter()
            .all(|&p| flow_entries(&windows, p).last().is_some_and(|f| f.closed))
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    let reads: u64 = readers
        .into_iter()
        .map(|r| r.join().expect("reader thread panicked"))
        .sum::<Result<u64>>()?;
    let after = Misses::now()?;
    agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(5))?;
    let missed = |name: &str| after.since(&before, name);
    let windows = agent.windows();
    let mut retransmits = 0;
    let mut incomplete = Vec::new();
    for &port in &ports {
        let flows = flow_entries(&windows, port);
        let last = flows
            .last()
            .context("a connection is missing from the windows")?;
        let whole = last.closed
            && last.pid == std::process::id()
            && last.states_seen.join(" ") == "ESTABLISHED SYN_SENT FIN_WAIT1 FIN_WAIT2 CLOSE";
        if !whole {
            incomplete.push((port, last.states_seen.join(" "), last.pid));
        }
        retransmits += flows.iter().map(|f| f.retransmits).sum::<u64>();
    }
    // Every change counted once: per connection SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2,
    // CLOSE. Summed over all the windows' flows to the server, whatever their local port.
    let remote = format!("{SERVER_ADDR}:5208");
    let changes: u64 = windows
        .iter()
        .flat_map(|w| &w.flows)
        .filter(|f| f.remote == remote)
        .map(|f| f.state_changes)
        .sum();
    let probe_missed = missed(agent_common::programs::TCP_PROBE.0);
    let state_missed = missed(agent_common::programs::SOCK_SET_STATE.0);
    eprintln!(
        "{reads} map reads on {cpus} CPUs; runs skipped: tcp_probe {probe_missed}, raw programs {:?}; {retransmits} retransmits; {changes} state changes, {} of them inferred; incomplete {incomplete:?}",
        agent_common::programs::RAW_TRACEPOINTS.map(|(p, _)| missed(p)),
        windows
            .iter()
            .map(|w| w.capture.states_inferred)
            .sum::<u64>()
    );
    // A raw program is still skipped when it interrupts itself on one CPU (a softirq's state
    // change while a process-context one runs): rarely — where the classic program lost 20–27
    // of these 300 changes — and the kernel counts each. A change in the middle of a
    // connection's life that no run saw (skipped, or never run for: 8 of about 120 runs of
    // this test had a SYN_SENT → ESTABLISHED unrecorded with no skip counted — see
    // `a_state_change_no_run_saw_is_recovered_from_the_next_one`) is recovered from the next
    // change; only a first or last one cannot be, so every connection lacking a state must be one
    // of the counted skips (a skipped run may also be another socket's: the server's, unwatched).
    for (prog, _) in agent_common::programs::RAW_TRACEPOINTS {
        assert!(missed(prog) <= 5, "{prog} skipped {} runs", missed(prog));
    }
    assert!(
        incomplete.len() as u64 <= state_missed,
        "connections lacking a state, beyond the {state_missed} skipped runs: {incomplete:?}"
    );
    let expected = 5 * ports.len() as u64;
    assert!(
        changes <= expected && changes + state_missed >= expected,
        "{changes} state changes counted of {expected}, {state_missed} runs skipped"
    );
    assert!(
        probe_missed > 0,
        "the map reads never held off tcp_probe: this test no longer stresses what it is about"
    );
    // The agent reports the skips itself (its windows' `capture.runs_skipped`, from the
    // programs' fdinfo): at least every one bpftool counted before it stopped (its last window
    // may hold a few more).
    let counted: u64 = agent_common::programs::ALL.iter().map(|p| missed(p)).sum();
    let reported: u64 = windows.iter().map(|w| w.capture.runs_skipped).sum();
    assert!(
        reported >= counted,
        "the agent reported {reported} skipped runs, bpftool counted {counted}"
    );
    assert!(retransmits > 0, "10 % loss produced no retransmit");
    Ok(())
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` or, on hybrid hosts, `.../unified`).
fn cgroup2_root() -> Result<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.get(2) == Some(&"cgroup2"))
        .and_then(|f| f.get(1).map(|s| s.to_string()))
        .context("no cgroup2 hierarchy mounted")
}

#[test]
fn cgroup_and_netns_filters_keep_only_matching_flows() -> Result<()> {
    let Some(_lock) = privileged("cgroup_and_netns_filters") else {
        return Ok(());
    };
    use std::os::unix::fs::MetadataExt;
    let bed = Testbed::create("cgrp")?;
    let _srv = DiscardServer::start(&bed.server, server(5204))?;
    let cg = format!("{}/tf-test-{}", cgroup2_root()?, std::process::id());
    std::fs::create_dir_all(&cg).with_context(|| format!("creating cgroup {cg}"))?;
    let cg_id = std::fs::metadata(&cg)?.ino();
    let run = || -> Result<()> {
        let agent = Agent::start(&["--interval", "1s", "--cgroup", &cg, "--port", "5204"])?;
        // A flow from this process (not in the cgroup) ...
        let mut outside = connect_from(&bed.client, server(5204))?;
        let outside_port = outside.local_addr()?.port();
        send_paced(&mut outside, 50_000, 1_000, Duration::from_millis(200))?;
        // ... and one from a shell that moved itself into the cgroup first.
        // (`ip netns exec` remounts /sys, so join the cgroup first and enter the namespace after.)
        let script = format!(
            "echo $$ > {cg}/cgroup.procs && exec ip netns exec {} bash -c \
             'exec 3<>/dev/tcp/{SERVER_ADDR}/5204 && echo hello >&3 && sleep 1'",
            bed.client
        );
        let status = Command::new("bash").args(["-c", &script]).status()?;
        anyhow::ensure!(status.success(), "the cgroup'd client failed: {status}");
        let seen = agent.windows().len();
        let windows = agent.wait_windows(seen + 2, Duration::from_secs(5))?;
        let flows: Vec<&FlowWindow> = windows.iter().flat_map(|w| &w.flows).collect();
        assert!(
            !flows.is_empty(),
            "the cgroup'd connection was not reported"
        );
        for f in &flows {
            assert_eq!(
                f.cgroup_id, cg_id,
                "flow outside the cgroup reported: {f:?}"
            );
            assert_ne!(f.local, format!("{CLIENT_ADDR}:{outside_port}"));
        }
        // Without the cgroup filter, the same agent sees netns-filtered flows only in the client namespace.
        drop(agent);
        let client_ns = tokenflow_testbed::netns_inode(&bed.client)?;
        let agent = agent_for(&bed, 5204)?;
        send_paced(&mut outside, 50_000, 1_000, Duration::from_millis(1500))?;
        let seen = agent.windows().len();
        let windows = agent.wait_windows(seen + 1, Duration::from_secs(5))?;
        let flows: Vec<&FlowWindow> = windows.iter().flat_map(|w| &w.flows).collect();
        assert!(
            flows
                .iter()
                .any(|f| f.local == format!("{CLIENT_ADDR}:{outside_port}"))
        );
        assert!(
            flows.iter().all(|f| f.netns == client_ns),
            "a flow from another namespace: {flows:?}"
        );
        Ok(())
    };
    let result = run();
    let _ = std::fs::remove_dir(&cg);
    result
}

/// Names of loaded BPF programs.
fn loaded_programs() -> Result<Vec<String>> {
    Ok(tokenflow_tests::bpf::programs()?
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_string))
        .collect())
}

/// How many of the agent's programs are loaded (names are cut to 15 bytes by the kernel).
fn ours_loaded() -> Result<usize> {
    let names = loaded_programs()?;
    let p = agent_common::programs::ALL.iter().chain(&[
        agent_common::programs::UPROBE_ENTRY,
        agent_common::programs::UPROBE_RETURN,
    ]);
    Ok(p.filter(|p| {
        names
            .iter()
            .any(|n| n.as_str() == **p || n.as_str() == &p[..p.len().min(15)])
    })
    .count())
}

fn wait_unloaded() -> Result<()> {
    let t0 = Instant::now();
    while ours_loaded()? > 0 {
        if t0.elapsed() > Duration::from_secs(2) {
            bail!(
                "agent programs still loaded 2 s after exit: {:?}",
                loaded_programs()?
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn nothing_stays_attached_after_sigterm_or_sigkill() -> Result<()> {
    let Some(_lock) = privileged("nothing_stays_attached") else {
        return Ok(());
    };
    for sig in [Signal::SIGTERM, Signal::SIGKILL] {
        assert_eq!(
            tokenflow_tests_marker(1),
            2,
            "keeps the marker in this binary"
        );
        // With a uprobe target too, so every program the agent can load is checked.
        let target = format!(
            "{}:{}",
            std::env::current_exe()?.display(),
            "tokenflow_tests_marker"
        );
        let mut agent = Agent::start(&[
            "--interval",
            "1s",
            "--metrics-addr",
            "off",
            "--uprobe",
            &target,
        ])?;
        assert_eq!(
            ours_loaded()?,
            agent_common::programs::ALL.len() + 2,
            "every program loads while the agent runs (the uprobe pair too)"
        );
        let took = agent.signal_and_wait(sig, Duration::from_secs(5))?;
        assert!(took <= Duration::from_secs(2), "{sig} exit took {took:?}");
        if sig == Signal::SIGTERM {
            assert!(
                !agent.windows().is_empty(),
                "SIGTERM flushes the last window"
            );
        }
        wait_unloaded()?;
    }
    Ok(())
}

/// Parses a tracepoint `format` file into (field name without array suffix, offset, size).
fn format_fields(sys: &str, name: &str) -> Result<Vec<(String, usize, usize)>> {
    let path = format!("/sys/kernel/tracing/events/{sys}/{name}/format");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut res = Vec::new();
    for line in text
        .lines()
        .filter(|l| l.trim_start().starts_with("field:"))
    {
        let parts: Vec<&str> = line.trim().split(';').map(str::trim).collect();
        let decl = parts[0].trim_start_matches("field:");
        let field = decl
            .rsplit(' ')
            .next()
            .unwrap_or("")
            .split('[')
            .next()
            .unwrap_or("")
            .to_string();
        let num = |key: &str| -> Option<usize> {
            parts
                .iter()
                .find_map(|p| p.strip_prefix(key))
                .and_then(|v| v.parse().ok())
        };
        res.push((
            field,
            num("offset:").context("offset")?,
            num("size:").context("size")?,
        ));
    }
    Ok(res)
}

#[test]
fn tracepoint_offsets_match_the_running_kernel() -> Result<()> {
    let Some(_lock) = privileged("tracepoint_offsets") else {
        return Ok(());
    };
    use agent_common::tracepoints::tcp_probe;
    // The one classic tracepoint; the raw ones' arguments are checked against BTF (agent unit tests).
    let checks: [(&str, &str, &[agent_common::tracepoints::Field]); 1] =
        [("tcp", "tcp_probe", &tcp_probe::FIELDS)];
    for (sys, name, fields) in checks {
        let live = format_fields(sys, name)?;
        for (field, off, size) in fields {
            let found = live.iter().find(|(n, _, _)| n == field);
            assert_eq!(
                found.map(|(_, o, s)| (*o, *s)),
                Some((*off, *size)),
                "{sys}:{name} field {field}: ours offset {off} size {size}, kernel {found:?}"
            );
        }
    }
    Ok(())
}

/// A function of this test binary for uprobe targets.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn tokenflow_tests_marker(x: u64) -> u64 {
    std::hint::black_box(x + 1)
}

#[test]
fn cidr_filter_keeps_only_remote_networks_listed() -> Result<()> {
    let Some(_lock) = privileged("cidr_filter") else {
        return Ok(());
    };
    let bed = Testbed::create("cidr")?;
    let _srv = DiscardServer::start(&bed.server, server(5209))?;
    let netns = format!("/run/netns/{}", bed.client);
    for (cidr, expect) in [
        ("198.18.9.0/24,2001:db8::/32", false),
        ("198.18.2.0/24", true),
    ] {
        let agent = Agent::start(&[
            "--interval",
            "1s",
            "--netns",
            &netns,
            "--cidr",
            cidr,
            "--metrics-addr",
            "off",
        ])?;
        let mut s = connect_from(&bed.client, server(5209))?;
        let port = s.local_addr()?.port();
        send_paced(&mut s, 50_000, 1_000, Duration::from_millis(1200))?;
        let seen = agent.windows().len();
        let windows = agent.wait_windows(seen + 1, Duration::from_secs(5))?;
        let found = !flow_entries(&windows, port).is_empty();
        assert_eq!(
            found, expect,
            "--cidr {cidr}: flow to {SERVER_ADDR} reported = {found}"
        );
    }
    Ok(())
}

/// Closed flows reach the agent through a ring buffer (1 MiB: 1149 flows) that it reads with each
/// window's snapshot; the kernel wakes it earlier only once the ring is half full
/// (`flow::closed_wakeup`), not for every close. Here 1500 connections open and close as fast as
/// they can, most of them within one window: none may be dropped, and every one must be reported
/// closed — but for those whose state changes the kernel skipped: a connection storm makes a
/// softirq's state change interrupt a connect() or close() on the same CPU often enough, and the
/// kernel runs no program nested in itself (it counts the run as a recursion miss; 0–66 of the
/// 15000 changes here). A connection missing without such a skip is the agent's loss.
#[test]
fn closes_past_the_rings_capacity_within_a_window_are_all_reported() -> Result<()> {
    use std::{
        collections::BTreeSet,
        net::{TcpListener, TcpStream},
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
    };
    let Some(_lock) = privileged("closes_past_the_ring") else {
        return Ok(());
    };
    const CONNECTIONS: usize = 1500;
    let bed = Testbed::create("ring")?;
    let port = 5211;
    let addr = server(port);
    // Accepts and closes at once.
    let listener =
        tokenflow_testbed::in_netns(&bed.server, move || TcpListener::bind(addr).context("bind"))?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let acceptor = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                if listener.accept().is_err() {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
        })
    };
    let mut agent = agent_for(&bed, port)?;
    let before = Misses::now()?;
    let ports = tokenflow_testbed::in_netns(&bed.client, move || {
        (0..CONNECTIONS)
            .map(|_| Ok(TcpStream::connect(addr)?.local_addr()?.port()))
            .collect::<Result<Vec<u16>>>()
    })?;
    let closed_ports = |windows: &[TelemetryWindow]| -> BTreeSet<u16> {
        windows
            .iter()
            .flat_map(|w| &w.flows)
            .filter(|f| f.closed)
            .filter_map(|f| f.local.rsplit(':').next()?.parse().ok())
            .collect()
    };
    // Until every connection shows its close, or 20 s (a skipped close never arrives).
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(20) {
        let closed = closed_ports(&agent.windows());
        if ports.iter().all(|p| closed.contains(p)) {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let skipped = Misses::now()?.since(&before, agent_common::programs::SOCK_SET_STATE.0);
    stop.store(true, Ordering::Relaxed);
    acceptor.join().expect("acceptor panicked");
    agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(5))?;
    let windows = agent.windows();
    let dropped: u64 = windows.iter().map(|w| w.capture.closed_dropped).sum();
    let most = windows
        .iter()
        .map(|w| w.flows.iter().filter(|f| f.closed).count())
        .max()
        .unwrap_or(0);
    let closed = closed_ports(&windows);
    let missing: Vec<u16> = ports
        .iter()
        .copied()
        .filter(|p| !closed.contains(p))
        .collect();
    eprintln!(
        "{CONNECTIONS} connections; most closed in one window {most}; dropped {dropped}; \
         not reported closed {}; state changes skipped by the kernel {skipped}",
        missing.len()
    );
    assert_eq!(dropped, 0, "closed flows dropped: the ring filled");
    assert!(
        missing.len() as u64 <= skipped,
        "{} of {CONNECTIONS} connections never reported closed (first: {:?}), and the kernel \
         skipped only {skipped} state changes",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    Ok(())
}
