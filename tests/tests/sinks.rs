//! The agent's sinks against a real redis-server and its real metrics endpoint: what lands in the stream
//! agrees with the kernel's own counters, and a Redis outage loses exactly the windows it reports lost.

use std::{
    net::{SocketAddr, SocketAddrV4},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use redis::Commands;
use tokenflow_schema::{NodeSummary, TelemetryWindow, keys};
use tokenflow_testbed::{
    CLIENT_ADDR, SERVER_ADDR, Testbed,
    traffic::{DiscardServer, connect_from, send_paced, wait_acked},
};
use tokenflow_tests::{
    agent::Agent,
    privileged,
    redis_server::{RedisCluster, RedisServer, free_port},
    ss,
};

/// Every window in the node's stream, with the entry ID's millisecond part.
fn stream(redis: &RedisServer, node: &str) -> Result<Vec<(u64, TelemetryWindow)>> {
    let mut c = redis.client()?;
    let reply: redis::streams::StreamRangeReply = c.xrange_all(keys::telemetry_stream(node))?;
    reply
        .ids
        .iter()
        .map(|e| {
            let ms =
                e.id.split('-')
                    .next()
                    .and_then(|m| m.parse().ok())
                    .context("entry id")?;
            let json: String = e
                .get(keys::WINDOW_FIELD)
                .context("entry without a window field")?;
            Ok((ms, serde_json::from_str(&json)?))
        })
        .collect()
}

#[test]
fn stream_latest_key_and_metrics_agree_with_the_kernel() -> Result<()> {
    let Some(_lock) = privileged("stream_latest_key_and_metrics") else {
        return Ok(());
    };
    let redis = RedisServer::start()?;
    let bed = Testbed::create("sink")?;
    bed.set_loss(50, 5206)?;
    let server = SocketAddr::V4(SocketAddrV4::new(SERVER_ADDR, 5206));
    let _srv = DiscardServer::start(&bed.server, server)?;
    let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let netns = format!("/run/netns/{}", bed.client);
    let mut agent = Agent::start(&[
        "--node-id",
        "sink-test",
        "--interval",
        "1s",
        "--netns",
        &netns,
        "--port",
        "5206",
        "--redis",
        &redis.url(),
        "--metrics-addr",
        &metrics.to_string(),
        "--sink",
        "stdout",
    ])?;
    let mut stream_ = connect_from(&bed.client, server)?;
    let port = stream_.local_addr()?.port();
    send_paced(&mut stream_, 1_000_000, 16_384, Duration::from_secs(3))?;
    wait_acked(&stream_, Duration::from_secs(30))?;
    let kernel = ss::sockets(&bed.client, &SERVER_ADDR.to_string())?
        .into_iter()
        .find(|s| s.local_port == port)
        .context("socket missing from ss")?
        .total_retrans;
    let seen = agent.windows().len();
    agent.wait_windows(seen + 2, Duration::from_secs(5))?;
    let text = tokenflow_tests::scrape_metrics(metrics)?;
    agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(5))?;
    let printed = agent.windows();

    let entries = stream(&redis, "sink-test")?;
    assert_eq!(
        entries.len(),
        printed.len(),
        "every printed window reached the stream"
    );
    for (ms, w) in &entries {
        assert_eq!(*ms, w.end_unix_ms, "entry IDs are window end times");
    }
    let local = format!("{CLIENT_ADDR}:{port}");
    let ours: u64 = entries
        .iter()
        .flat_map(|(_, w)| &w.flows)
        .filter(|f| f.local == local)
        .map(|f| f.retransmits)
        .sum();
    eprintln!("stream retransmits {ours}, kernel total_retrans {kernel}");
    assert!(kernel > 0);
    assert_eq!(ours, kernel);

    let mut c = redis.client()?;
    let latest: String = c.get(keys::latest("sink-test"))?;
    let latest: NodeSummary = serde_json::from_str(&latest)?;
    assert_eq!(
        latest.seq,
        entries.last().map(|(_, w)| w.seq).unwrap_or(u64::MAX)
    );
    let nodes: Vec<String> = c.smembers(keys::NODES)?;
    assert_eq!(nodes, ["sink-test"]);

    let names: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_whitespace().next())
        .collect();
    assert!(names.contains(&"tokenflow_agent_rtt_seconds"), "{text}");
    for n in &names {
        assert!(
            tokenflow_agent::sink::prometheus::follows_convention(n),
            "{n}"
        );
    }
    let metric_retrans: f64 = text
        .lines()
        .filter(|l| l.starts_with("tokenflow_agent_retransmits_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        metric_retrans >= 1.0 && metric_retrans <= kernel as f64,
        "metrics show {metric_retrans}"
    );
    drop(stream_);
    Ok(())
}

/// Kills Redis for `outage`, restarts it, and checks the stream against what the agent printed.
fn outage(buffer: usize, outage: Duration) -> Result<(u64, u64)> {
    let mut redis = RedisServer::start()?;
    let buffer = buffer.to_string();
    let mut agent = Agent::start(&[
        "--node-id",
        "outage",
        "--interval",
        "500ms",
        "--redis",
        &redis.url(),
        "--redis-buffer",
        &buffer,
        "--metrics-addr",
        "off",
        "--sink",
        "stdout",
        "--port",
        "1",
    ])?;
    agent.wait_windows(4, Duration::from_secs(10))?;
    redis.kill();
    std::thread::sleep(outage);
    redis.restart()?;
    // Until the buffer has drained and a few windows more have arrived.
    let t0 = Instant::now();
    loop {
        let w = agent.windows();
        if w.last()
            .is_some_and(|l| l.sinks.redis_connected && l.sinks.redis_buffered == 0)
        {
            break;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            bail!("the stream did not resume within 30 s of the restart");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let seen = agent.windows().len();
    agent.wait_windows(seen + 2, Duration::from_secs(5))?;
    agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(5))?;
    let printed = agent.windows();
    let reported = printed
        .last()
        .map(|w| w.sinks.redis_dropped_total)
        .unwrap_or(0);
    let stored: std::collections::BTreeSet<u64> = stream(&redis, "outage")?
        .into_iter()
        .map(|(_, w)| w.seq)
        .collect();
    let missing = printed.iter().filter(|w| !stored.contains(&w.seq)).count() as u64;
    eprintln!(
        "buffer {buffer}, outage {outage:?}: {} windows, {missing} missing from the stream, {reported} reported dropped",
        printed.len()
    );
    Ok((missing, reported))
}

#[test]
fn redis_outage_loses_exactly_what_it_reports() -> Result<()> {
    let Some(_lock) = privileged("redis_outage") else {
        return Ok(());
    };
    // 20 s down at 2 windows/s with room for 5: about 35 windows dropped, each one counted.
    let (missing, reported) = outage(5, Duration::from_secs(20))?;
    assert!(
        missing >= 20,
        "the outage should have overflowed the buffer"
    );
    assert_eq!(missing, reported);
    // The default buffer (10 minutes of windows) holds a 20 s outage: nothing lost.
    let (missing, reported) = outage(600, Duration::from_secs(20))?;
    assert_eq!((missing, reported), (0, 0));
    Ok(())
}

#[test]
fn config_errors_are_one_line_and_exit_2() -> Result<()> {
    let bin = tokenflow_tests::agent::agent_binary()?;
    for args in [
        vec!["--netns", "/no/such/netns"],
        vec!["--metrics-addr", "nowhere"],
        vec!["--redis", "http://127.0.0.1:6379"],
        vec!["--interval", "soon"],
    ] {
        let out = std::process::Command::new(&bin).args(&args).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert!(
            !lines.is_empty() && lines[0].starts_with("error") || lines[0].contains("error"),
            "{args:?}: {err}"
        );
        assert!(lines.len() <= 3, "{args:?}: not one clear line:\n{err}");
    }
    Ok(())
}

#[test]
fn windows_reach_a_redis_cluster_and_are_announced() -> Result<()> {
    let Some(_lock) = privileged("windows_reach_a_redis_cluster") else {
        return Ok(());
    };
    let cluster = RedisCluster::start(3)?;
    // Classic pub/sub crosses the cluster: a subscriber on one node hears agents writing anywhere.
    let mut sub = cluster.nodes[0].client()?;
    let mut ps = sub.as_pubsub();
    ps.subscribe(keys::WINDOWS_CHANNEL)?;
    ps.set_read_timeout(Some(Duration::from_millis(200)))?;
    let mut agent = Agent::start(&[
        "--node-id",
        "cluster-node",
        "--interval",
        "500ms",
        "--redis",
        &cluster.urls(),
        "--redis-cluster",
        "--metrics-addr",
        "off",
        "--sink",
        "stdout",
    ])?;
    agent.wait_windows(4, Duration::from_secs(15))?;
    agent.signal_and_wait(Signal::SIGTERM, Duration::from_secs(5))?;
    let printed = agent.windows();
    let mut announced = Vec::new();
    while let Ok(m) = ps.get_message() {
        announced.push(m.get_payload::<String>()?);
    }

    let seeds: Vec<String> = cluster.nodes.iter().map(|n| n.url()).collect();
    let mut c = redis::cluster::ClusterClient::new(seeds)?.get_connection()?;
    let reply: redis::streams::StreamRangeReply =
        c.xrange_all(keys::telemetry_stream("cluster-node"))?;
    assert_eq!(
        reply.ids.len(),
        printed.len(),
        "every printed window reached the cluster's stream"
    );
    let latest: String = c.get(keys::latest("cluster-node"))?;
    let latest: NodeSummary = serde_json::from_str(&latest)?;
    assert_eq!(Some(latest.seq), printed.last().map(|w| w.seq));
    let nodes: Vec<String> = c.smembers(keys::NODES)?;
    assert_eq!(nodes, ["cluster-node"]);
    assert_eq!(
        announced.len(),
        printed.len(),
        "one announcement per window: {announced:?}"
    );
    assert!(announced.iter().all(|n| n == "cluster-node"));
    Ok(())
}
