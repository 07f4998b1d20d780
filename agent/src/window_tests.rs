use agent_common::{AF_INET, FlowState, TCP_CLOSE, TCP_ESTABLISHED, bucket_index};
use proptest::prelude::*;
use tokenflow_schema::{GpuDevice, GpuWindow};

use crate::gpu::{FakeGpuProvider, GpuProvider};

use super::*;

fn flow(sk: u64, remote: [u8; 4], first_seen: u64) -> FlowState {
    let mut f = FlowState::zeroed();
    f.sk = sk;
    f.family = AF_INET;
    f.saddr[..4].copy_from_slice(&[198, 18, 0, 1]);
    f.daddr[..4].copy_from_slice(&remote);
    f.sport = 40000;
    f.dport = 8000;
    f.first_seen_ns = first_seen;
    f.state = TCP_ESTABLISHED as u32;
    f
}

fn sample(f: &mut FlowState, rtt_us: u32, n: u32) {
    f.rtt_hist[bucket_index(rtt_us)] += n;
    f.rtt_samples += n as u64;
    f.rtt_sum_us += rtt_us as u64 * n as u64;
}

fn snap(live: Vec<FlowState>, closed: Vec<FlowState>, t: u64) -> Snapshot {
    Snapshot {
        live,
        closed,
        counters: [0; counters::COUNT as usize],
        start_unix_ms: t,
        end_unix_ms: t + 1000,
        gpu: GpuWindow::default(),
        backlog: Default::default(),
        req_lat: Default::default(),
        probe_lat: Default::default(),
        skipped_runs: 0,
    }
}

#[test]
fn second_window_holds_only_its_interval() {
    let mut b = WindowBuilder::new("n1");
    let mut f = flow(1, [198, 18, 2, 2], 10);
    sample(&mut f, 20_000, 10);
    f.retrans_segs = 3;
    let w1 = b.build(snap(vec![f], vec![], 0));
    assert_eq!(w1.flows.len(), 1);
    assert_eq!(w1.seq, 0);
    assert_eq!(w1.flows[0].retransmits, 3);
    assert_eq!(w1.flows[0].rtt.samples, 10);

    sample(&mut f, 80_000, 5);
    f.retrans_segs = 4;
    let w2 = b.build(snap(vec![f], vec![], 1000));
    assert_eq!(w2.seq, 1);
    assert_eq!(w2.flows[0].rtt.samples, 5);
    assert_eq!(w2.flows[0].retransmits, 1);
    let p50 = w2.flows[0].rtt.p50_us as f64;
    assert!((p50 - 80_000.0).abs() / 80_000.0 < 0.07, "p50 {p50}");
    assert_eq!(w2.flows[0].retransmit_rate_per_s, 1.0);
}

#[test]
fn node_rtt_is_the_sum_of_the_flows_in_the_interval() {
    let mut b = WindowBuilder::new("n1");
    let mut a = flow(1, [198, 18, 2, 2], 10);
    let mut c = flow(2, [198, 18, 2, 3], 10);
    sample(&mut a, 1_000, 90);
    b.build(snap(vec![a, c], vec![], 0));
    // Second interval: 10 samples at 1 ms on one flow, 90 at 100 ms on a flow that then closed.
    sample(&mut a, 1_000, 10);
    sample(&mut c, 100_000, 90);
    c.state = TCP_CLOSE as u32;
    let w = b.build(snap(vec![a], vec![c], 1000));
    assert_eq!(w.node.rtt.samples, 100);
    let p50 = w.node.rtt.p50_us as f64;
    assert!((p50 - 100_000.0).abs() / 100_000.0 < 0.07, "p50 {p50}");
    let w = b.build(snap(vec![a], vec![], 2000));
    assert_eq!(w.node.rtt.samples, 0, "an idle interval has no RTT samples");
}

#[test]
fn a_histogram_slot_that_wraps_still_counts_its_interval() {
    let mut b = WindowBuilder::new("n1");
    let mut f = flow(1, [198, 18, 2, 2], 10);
    f.rtt_hist[bucket_index(20_000)] = u32::MAX - 1;
    f.rtt_samples = u64::from(u32::MAX - 1);
    b.build(snap(vec![f], vec![], 0));
    f.rtt_hist[bucket_index(20_000)] = f.rtt_hist[bucket_index(20_000)].wrapping_add(5);
    f.rtt_samples += 5;
    let w = b.build(snap(vec![f], vec![], 1000));
    assert_eq!(w.node.rtt.samples, 5);
}

#[test]
fn a_slot_read_one_lower_than_before_adds_nothing() {
    let mut b = WindowBuilder::new("n1");
    let mut f = flow(1, [198, 18, 2, 2], 10);
    sample(&mut f, 20_000, 10);
    b.build(snap(vec![f], vec![], 0));
    f.rtt_hist[bucket_index(20_000)] -= 1;
    let w = b.build(snap(vec![f], vec![], 1000));
    assert_eq!(w.node.rtt.samples, 0);
}

#[test]
fn a_flow_before_its_source_port_is_chosen_waits_for_the_next_window() {
    let mut b = WindowBuilder::new("n1");
    let mut f = flow(1, [198, 18, 2, 2], 10);
    f.sport = 0;
    f.state = agent_common::TCP_SYN_SENT as u32;
    f.states_seen = 1 << agent_common::TCP_SYN_SENT;
    f.state_changes = 1;
    let w1 = b.build(snap(vec![f], vec![], 0));
    assert!(w1.flows.is_empty(), "{:?}", w1.flows);
    f.sport = 40000;
    f.state = TCP_ESTABLISHED as u32;
    f.states_seen |= 1 << TCP_ESTABLISHED;
    f.state_changes = 2;
    let w2 = b.build(snap(vec![f], vec![], 1000));
    assert_eq!(w2.flows.len(), 1);
    assert_eq!(w2.flows[0].local, "198.18.0.1:40000");
    assert_eq!(
        w2.flows[0].state_changes, 2,
        "both changes, in the window that shows the port"
    );
}

#[test]
fn idle_flows_are_left_out() {
    let mut b = WindowBuilder::new("n1");
    let mut f = flow(1, [198, 18, 2, 2], 10);
    sample(&mut f, 1000, 1);
    b.build(snap(vec![f], vec![], 0));
    let w = b.build(snap(vec![f], vec![], 1000));
    assert!(w.flows.is_empty());
    assert_eq!(w.capture.flows_tracked, 1);
}

#[test]
fn closed_flow_reports_final_delta_once() {
    let mut b = WindowBuilder::new("n1");
    let mut f = flow(7, [198, 18, 2, 2], 10);
    sample(&mut f, 5000, 4);
    b.build(snap(vec![f], vec![], 0));
    sample(&mut f, 5000, 2);
    f.state = TCP_CLOSE as u32;
    f.state_changes += 1;
    let w = b.build(snap(vec![], vec![f], 1000));
    assert_eq!(w.flows.len(), 1);
    assert!(w.flows[0].closed);
    assert_eq!(w.flows[0].rtt.samples, 2);
    assert_eq!(w.flows[0].state, "CLOSE");
    assert_eq!(w.node.closed_flows, 1);
    let w = b.build(snap(vec![], vec![], 2000));
    assert!(w.flows.is_empty(), "closed flow must not reappear");
}

#[test]
fn flow_seen_live_and_closed_in_one_snapshot_is_merged() {
    let mut b = WindowBuilder::new("n1");
    let mut f = flow(7, [198, 18, 2, 2], 10);
    sample(&mut f, 5000, 4);
    let live = f;
    sample(&mut f, 5000, 1);
    f.state = TCP_CLOSE as u32;
    let w = b.build(snap(vec![live], vec![f], 0));
    assert_eq!(w.flows.len(), 1);
    assert_eq!(w.flows[0].rtt.samples, 5);
    assert!(w.flows[0].closed);
}

#[test]
fn a_flow_that_closes_between_the_ring_drain_and_the_map_read_counts_only_its_last_interval() {
    // The snapshot drains the ring buffer, then lists the map: a flow closing in between is in
    // neither, and its final state arrives with the next snapshot. Its lifetime (1000 samples,
    // 10 MB) must not land in that window; only what it did since its last live copy.
    let mut b = WindowBuilder::new("n1");
    let mut f = flow(7, [198, 18, 2, 2], 10);
    sample(&mut f, 5000, 1000);
    f.bytes_acked = 10_000_000;
    b.build(snap(vec![f], vec![], 0));
    let w = b.build(snap(vec![], vec![], 1000));
    assert!(w.flows.is_empty());
    sample(&mut f, 5000, 3);
    f.bytes_acked += 4000;
    f.state = TCP_CLOSE as u32;
    let w = b.build(snap(vec![], vec![f], 2000));
    assert_eq!(w.flows.len(), 1);
    assert_eq!(w.node.rtt.samples, 3);
    assert_eq!(w.node.bytes_acked, 4000);
    assert!(w.flows[0].closed);
    assert!(
        b.vanished.is_empty(),
        "nothing of it is kept once its final state came"
    );
}

#[test]
fn a_new_flow_on_a_closed_sockets_key_keeps_both_flows_apart() {
    // The kernel reuses a closed socket's memory: the new flow has the old key, and the old
    // flow's final state arrives in the same snapshot (seen on the test bed when 12 connections
    // closed and 12 opened at once: each old flow's whole life landed in one window).
    let mut b = WindowBuilder::new("n1");
    let mut old = flow(7, [198, 18, 2, 2], 10);
    sample(&mut old, 5000, 1000);
    old.bytes_acked = 2_000_000;
    b.build(snap(vec![old], vec![], 0));
    sample(&mut old, 5000, 2);
    old.bytes_acked += 3000;
    old.state = TCP_CLOSE as u32;
    let mut new = flow(7, [198, 18, 2, 2], 99);
    sample(&mut new, 5000, 5);
    new.bytes_acked = 7000;
    let w = b.build(snap(vec![new], vec![old], 1000));
    assert_eq!(w.node.rtt.samples, 7);
    assert_eq!(w.node.bytes_acked, 10_000);
    assert_eq!(w.flows.len(), 2);
    assert_eq!(w.flows.iter().filter(|f| f.closed).count(), 1);
    assert_eq!(w.node.active_flows, 1);
    // The new flow's baseline survived the old one's final state.
    sample(&mut new, 5000, 1);
    let w = b.build(snap(vec![new], vec![], 2000));
    assert_eq!(w.node.rtt.samples, 1);
}

#[test]
fn a_vanished_flow_whose_final_state_never_comes_is_forgotten() {
    let mut b = WindowBuilder::new("n1");
    let mut f = flow(7, [198, 18, 2, 2], 10);
    sample(&mut f, 5000, 10);
    b.build(snap(vec![f], vec![], 0));
    for t in 1..=VANISHED_SNAPSHOTS as u64 + 1 {
        b.build(snap(vec![], vec![], t * 1000));
    }
    assert!(b.vanished.is_empty());
}

#[test]
fn reused_key_is_a_new_flow() {
    let mut b = WindowBuilder::new("n1");
    let mut f = flow(9, [198, 18, 2, 2], 10);
    sample(&mut f, 5000, 100);
    b.build(snap(vec![f], vec![], 0));
    let mut g = flow(9, [198, 18, 2, 3], 99);
    sample(&mut g, 5000, 3);
    let w = b.build(snap(vec![g], vec![], 1000));
    assert_eq!(w.flows[0].rtt.samples, 3);
    assert_eq!(w.flows[0].remote, "198.18.2.3:8000");
}

#[test]
fn remotes_group_flows_by_address() {
    let mut b = WindowBuilder::new("n1");
    let mut a = flow(1, [198, 18, 2, 2], 1);
    let mut c = flow(2, [198, 18, 2, 2], 1);
    let mut d = flow(3, [198, 18, 2, 9], 1);
    sample(&mut a, 10_000, 1);
    sample(&mut c, 30_000, 1);
    sample(&mut d, 50_000, 1);
    let w = b.build(snap(vec![a, c, d], vec![], 0));
    assert_eq!(w.remotes.len(), 2);
    let r = &w.remotes[0];
    assert_eq!(
        (r.remote_addr.as_str(), r.flows, r.rtt.samples),
        ("198.18.2.2", 2, 2)
    );
    assert_eq!(r.rtt.mean_us, 20_000);
}

proptest! {
    /// Summing every window's samples gives the kernel's cumulative count, however the
    /// cumulative state grows between snapshots.
    #[test]
    fn windows_partition_the_samples(steps in prop::collection::vec((0u32..50, 1u32..100_000), 1..20)) {
        let mut b = WindowBuilder::new("n");
        let mut f = flow(1, [198, 18, 2, 2], 1);
        let mut total = 0u64;
        for (i, (n, rtt)) in steps.iter().enumerate() {
            sample(&mut f, *rtt, *n);
            let w = b.build(snap(vec![f], vec![], i as u64 * 1000));
            let in_window: u64 = w.flows.iter().map(|x| x.rtt.samples).sum();
            prop_assert_eq!(in_window, u64::from(*n), "window {} holds exactly its own samples", i);
            total += in_window;
        }
        prop_assert_eq!(total, f.rtt_samples);
    }
}

#[test]
fn gpu_sample_is_joined_into_the_window() {
    let mut fake = FakeGpuProvider {
        devices: vec![GpuDevice {
            index: 0,
            name: "fake-gpu".into(),
            utilization_percent: Some(87),
            memory_used_bytes: Some(1 << 30),
            ..Default::default()
        }],
    };
    let mut b = WindowBuilder::new("n1");
    let mut s = snap(vec![], vec![], 0);
    s.gpu = fake.sample();
    let w = b.build(s);
    assert!(w.gpu.available);
    assert_eq!(w.gpu.provider, "fake");
    assert_eq!(w.gpu.devices[0].utilization_percent, Some(87));
    let json = serde_json::to_value(&w).unwrap();
    assert_eq!(json["gpu"]["devices"][0]["name"], "fake-gpu");
}
