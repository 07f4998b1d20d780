//! Hint-server figures for `cargo xtask bench`: decision cost per window (features, Isolation
//! Forest, GBDT, controller, sharing), training time on the committed trace, and the HTTP API's
//! throughput on one core (wrk) with its latency at half that load (an open-loop client that
//! measures from each request's scheduled send time, so queueing in the client counts).

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use tokenflow_schema::{ControllerKind, HINT_SCHEMA_VERSION, Hint, keys};
use tokenflow_tests::{
    hint_server::http,
    redis_server::{RedisCluster, RedisServer, free_port},
};

use crate::{
    report::Figure,
    util::{cargo, output, root, run, step},
};

pub fn measure() -> Result<Vec<Figure>> {
    step("bench", "building the hint server (release)");
    run(cargo().args(["build", "--release", "-p", "tokenflow-hint-server"]))?;
    let bin = root().join("target/release/tokenflow-hint-server");
    let mut figures = decision_cost(&bin, &root().join("hint-server/fixtures/trace.jsonl"))?;
    figures.extend(http_figures(&bin)?);
    figures.extend(scale_figures(&bin, &ScaleRedis::server()?)?);
    figures.extend(scale_figures(&bin, &ScaleRedis::cluster()?)?);
    Ok(figures)
}

/// The Redis of a scale run: one server, or a local three-node Redis Cluster.
enum ScaleRedis {
    Server(RedisServer),
    Cluster(RedisCluster),
}

impl ScaleRedis {
    fn server() -> Result<Self> {
        Ok(Self::Server(RedisServer::start_ephemeral()?))
    }

    fn cluster() -> Result<Self> {
        Ok(Self::Cluster(RedisCluster::start(3)?))
    }

    fn nodes(&self) -> Vec<&RedisServer> {
        match self {
            Self::Server(s) => vec![s],
            Self::Cluster(c) => c.nodes.iter().collect(),
        }
    }

    /// `--redis …` (and `--redis-cluster`).
    fn args(&self) -> Vec<String> {
        match self {
            Self::Server(s) => vec!["--redis".into(), s.url()],
            Self::Cluster(c) => vec!["--redis".into(), c.urls(), "--redis-cluster".into()],
        }
    }

    /// Figure name prefix and what the Redis is, in words.
    fn label(&self) -> (&'static str, &'static str) {
        match self {
            Self::Server(_) => ("hint.scale", "one Redis"),
            Self::Cluster(_) => ("hint.scale_cluster", "a 3-node Redis Cluster"),
        }
    }

    /// `INFO` counters summed over the Redis servers.
    fn info(&self) -> Result<std::collections::HashMap<String, f64>> {
        let mut sum = std::collections::HashMap::new();
        for n in self.nodes() {
            for (k, v) in redis_info(&mut n.client()?)? {
                *sum.entry(k).or_insert(0.0) += v;
            }
        }
        Ok(sum)
    }
}

/// `INFO` fields of a Redis, as numbers.
fn redis_info(con: &mut redis::Connection) -> Result<std::collections::HashMap<String, f64>> {
    let text: String = redis::cmd("INFO").arg("all").query(con)?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter_map(|(k, v)| v.trim().parse().ok().map(|v| (k.to_string(), v)))
        .collect())
}

fn windows_decided(metrics: SocketAddr) -> f64 {
    tokenflow_tests::scrape_metrics(metrics)
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("tokenflow_hint_windows_total "))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Two replicas (release) against one Redis, or a three-node Redis Cluster, fed by the node
/// SIMULATOR: 1,000 nodes' synthetic windows per second, one client per node. Measured over 20 s after a 12 s start: GET latency of
/// random clients' hints alternating between the replicas, the age of the hints served, the
/// windows both replicas decide per second, and Redis' load (commands/s, CPU, memory).
fn scale_figures(bin: &Path, redis: &ScaleRedis) -> Result<Vec<Figure>> {
    const NODES: usize = 1000;
    let (prefix, what) = redis.label();
    step(
        "bench",
        format!(
            "scale: 2 hint-server replicas on {what}, {NODES} simulated nodes (synthetic windows)"
        ),
    );
    let mut children = Vec::new();
    let mut replicas = Vec::new();
    for name in ["replica-a", "replica-b"] {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        children.push(
            Command::new(bin)
                .arg("serve")
                .args(redis.args())
                .args(["--listen", &addr.to_string()])
                .args(["--metrics-addr", &metrics.to_string(), "--consumer", name])
                .env("RUST_LOG", "warn")
                .spawn()
                .context("starting a hint-server replica")?,
        );
        replicas.push((addr, metrics));
    }
    children.push(
        Command::new(bin)
            .arg("simulate-nodes")
            .args(redis.args())
            .args(["--nodes", &NODES.to_string()])
            .args(["--duration", "40s"])
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("starting the node simulator")?,
    );
    let result = (|| -> Result<Vec<Figure>> {
        std::thread::sleep(Duration::from_secs(12));
        let before = redis.info()?;
        let decided0: f64 = replicas.iter().map(|r| windows_decided(r.1)).sum();
        let t0 = Instant::now();
        let (mut lat_us, mut age_ms, mut failed) = (Vec::new(), Vec::new(), 0usize);
        let mut k = 0usize;
        while t0.elapsed() < Duration::from_secs(20) {
            let (addr, _) = replicas[k % 2];
            let id = format!("sim-client-{:05}", fastrand::usize(..NODES));
            let t = Instant::now();
            match http(addr, "GET", &format!("/v1/hints/{id}"), None, None) {
                Ok((200, body)) => {
                    lat_us.push(t.elapsed().as_secs_f64() * 1e6);
                    if let Ok(h) = serde_json::from_str::<Hint>(&body) {
                        let now = std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)?
                            .as_millis() as u64;
                        age_ms.push(now.saturating_sub(h.issued_at_unix_ms) as f64);
                    }
                }
                _ => failed += 1,
            }
            k += 1;
            std::thread::sleep(Duration::from_millis(5));
        }
        let secs = t0.elapsed().as_secs_f64();
        let after = redis.info()?;
        let decided1: f64 = replicas.iter().map(|r| windows_decided(r.1)).sum();
        let delta =
            |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
        let ops = delta("total_commands_processed") / secs;
        let cpu = (delta("used_cpu_sys") + delta("used_cpu_user")) / secs;
        let mem_mb = after.get("used_memory").copied().unwrap_or(0.0) / 1e6;
        let decided = (decided1 - decided0) / secs;
        anyhow::ensure!(!lat_us.is_empty(), "no hint was served ({failed} failures)");
        let pct = |v: &mut Vec<f64>, q: f64| {
            v.sort_by(f64::total_cmp);
            v[((v.len() - 1) as f64 * q).round() as usize]
        };
        let (p50, p99) = (pct(&mut lat_us, 0.5), pct(&mut lat_us, 0.99));
        let age99 = if age_ms.is_empty() {
            f64::NAN
        } else {
            pct(&mut age_ms, 0.99)
        };
        step(
            "bench",
            format!(
                "scale ({what}): {decided:.0} windows decided/s by 2 replicas; GET p50 {p50:.0} µs, p99 {p99:.0} µs ({} requests, {failed} failed); hint age p99 {age99:.0} ms; Redis {ops:.0} commands/s, {:.0} % of a core, {mem_mb:.0} MB",
                lat_us.len(),
                cpu * 100.0
            ),
        );
        let name = |n: &str| format!("{prefix}_{n}");
        Ok(vec![
            Figure::new(
                &name("windows_decided_per_s"),
                decided,
                "windows/s",
                &format!(
                    "2 replicas (release, one consumer group) on {what}, 1,000 simulated nodes at 1 window/s each"
                ),
            ),
            Figure::new(
                &name("get_p50_us"),
                p50,
                "µs",
                "GET /v1/hints of random clients, alternating replicas, sequential, while both ingest 1,000 nodes",
            ),
            Figure::new(&name("get_p99_us"), p99, "µs", "same, 99th percentile"),
            Figure::new(
                &name("hint_age_p99_ms"),
                age99,
                "ms",
                "age of the hints served (now − issued_at); a window per second per node",
            ),
            Figure::new(
                &name("redis_commands_per_s"),
                ops,
                "commands/s",
                &format!(
                    "total_commands_processed rate of {what} (simulator + 2 replicas + reads)"
                ),
            ),
            Figure::new(
                &name("redis_cpu_fraction"),
                cpu,
                "cores",
                "used_cpu_sys + used_cpu_user per second, summed over the Redis servers",
            ),
            Figure::new(
                &name("redis_memory_mb"),
                mem_mb,
                "MB",
                "used_memory at the end, summed (streams capped at ~600 windows per node)",
            ),
        ])
    })();
    for mut c in children {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = c.wait();
    }
    result
}

fn decision_cost(bin: &Path, fixture: &Path) -> Result<Vec<Figure>> {
    let out = output(
        Command::new(bin)
            .arg("bench-decision")
            .arg("--trace")
            .arg(fixture),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&out).with_context(|| format!("bench-decision printed {out}"))?;
    let get = |k: &str| {
        v[k].as_f64()
            .with_context(|| format!("bench-decision lacks {k}"))
    };
    let (mean, p99, train_s) = (
        get("decision_us_mean")?,
        get("decision_us_p99")?,
        get("training_s")?,
    );
    step(
        "bench",
        format!("decision per window: mean {mean:.1} µs, p99 {p99:.1} µs; training {train_s:.2} s"),
    );
    Ok(vec![
        Figure::new(
            "hint.decision_us_mean",
            mean,
            "µs",
            "per window: features + Isolation Forest + GBDT + PID + sharing, 2 clients (release); target ≤ 100",
        ),
        Figure::new(
            "hint.decision_us_p99",
            p99,
            "µs",
            "same, 99th percentile over 5 passes of the committed trace",
        ),
        Figure::new(
            "hint.training_s",
            train_s,
            "s",
            "Isolation Forest + GBDT at 1 and 5 windows on the committed trace (release)",
        ),
    ])
}

fn http_figures(bin: &Path) -> Result<Vec<Figure>> {
    let redis = RedisServer::start_ephemeral()?;
    // Redis and the load generators share CPU 0; the hint server has CPU 1 to itself.
    if let Some(pid) = redis.pid() {
        run(Command::new("taskset").args(["-p", "-c", "0", &pid.to_string()]))?;
    }
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    // One core for the server (CPU 1, one worker), the load generator on the other.
    let mut child = Command::new("taskset")
        .args(["-c", "1"])
        .arg(bin)
        .args([
            "serve",
            "--redis",
            &redis.url(),
            "--listen",
            &addr.to_string(),
            "--metrics-addr",
            "off",
        ])
        .args(["--token", "bench", "--workers", "1"])
        .env("RUST_LOG", "warn")
        .spawn()
        .context("starting the hint server")?;
    let result = (|| -> Result<Vec<Figure>> {
        let t0 = Instant::now();
        while http(addr, "GET", "/healthz", None, None)
            .map(|r| r.0)
            .unwrap_or(0)
            != 200
        {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("the hint server did not start");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let (code, body) = http(
            addr,
            "PUT",
            "/v1/clients/bench",
            Some("bench"),
            Some(r#"{"node_id":"bench"}"#),
        )?;
        anyhow::ensure!(code == 200, "registering the client: {code} {body}");
        // A current hint, as the ingest of a replica stores and publishes it; the server answers
        // from the copy its subscription keeps (Redis is the fallback when that copy expired).
        let hint = Hint {
            schema_version: HINT_SCHEMA_VERSION,
            client_id: "bench".into(),
            node_id: "bench".into(),
            rate_limit_rps: 12.5,
            max_concurrency: 8,
            tokens_per_s: 1600.0,
            health: 0.8,
            anomaly_score: 0.4,
            predicted_rtt_ms: Some(31.0),
            observed_rtt_ms: Some(30.0),
            controller: ControllerKind::Pid,
            reason: "bench".into(),
            issued_at_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as u64,
            ttl_ms: 3_600_000,
            stale: false,
        };
        let _: () = redis::cmd("PSETEX")
            .arg(keys::hint("bench"))
            .arg(3_600_000)
            .arg(serde_json::to_string(&hint)?)
            .query(&mut redis.client()?)?;
        std::thread::sleep(Duration::from_millis(500)); // the server's subscription is up by now
        let _: () = redis::cmd("PUBLISH")
            .arg(keys::HINTS_CHANNEL)
            .arg(serde_json::to_string(&hint)?)
            .query(&mut redis.client()?)?;
        let url = format!("http://{addr}/v1/hints/bench");
        let out = output(Command::new("taskset").args([
            "-c",
            "0",
            "wrk",
            "-t1",
            "-c32",
            "-d10s",
            "--latency",
            &url,
        ]))?;
        let rps = out
            .lines()
            .find_map(|l| l.strip_prefix("Requests/sec:"))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("no Requests/sec in wrk's output:\n{out}"))?;
        step(
            "bench",
            format!("GET /v1/hints: {rps:.0} requests/s on one core (wrk -c32)"),
        );
        let (p50, p99, sent) = open_loop(
            addr,
            "/v1/hints/bench",
            rps / 2.0,
            Duration::from_secs(10),
            16,
        )?;
        step(
            "bench",
            format!(
                "at {:.0} requests/s (half), 16 connections: p50 {p50:.0} µs, p99 {p99:.0} µs over {sent} requests",
                rps / 2.0
            ),
        );
        let (_, p99_64, sent64) = open_loop(
            addr,
            "/v1/hints/bench",
            rps / 2.0,
            Duration::from_secs(10),
            64,
        )?;
        step(
            "bench",
            format!("same over 64 connections: p99 {p99_64:.0} µs over {sent64} requests"),
        );
        Ok(vec![
            Figure::new(
                "hint.http_requests_per_s_one_core",
                rps,
                "req/s",
                "GET /v1/hints/{id}, server on one core with one worker, wrk -t1 -c32 -d10s on the other",
            ),
            Figure::new(
                "hint.http_p50_us_at_half_load",
                p50,
                "µs",
                "open-loop at half the wrk rate, 16 keep-alive connections from one spinning thread, from each request's scheduled send time",
            ),
            Figure::new(
                "hint.http_p99_us_at_half_load",
                p99,
                "µs",
                "same, 99th percentile; target ≤ 1000",
            ),
            Figure::new(
                "hint.http_p99_us_at_half_load_64_connections",
                p99_64,
                "µs",
                "same rate spread over 64 connections (burstier arrivals)",
            ),
        ])
    })();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    result
}

/// Sends GETs at a fixed total `rate` over `conns` keep-alive connections from one spinning thread
/// on CPU 0 (non-blocking sockets, no thread per connection, so the generator itself does not
/// become the queue). Latency counts from when each request was due: a response that comes back
/// late delays that connection's next request, and the delay is charged to it, not hidden.
fn open_loop(
    addr: SocketAddr,
    path: &str,
    rate: f64,
    d: Duration,
    conns: usize,
) -> Result<(f64, f64, usize)> {
    let mut cpu0 = nix::sched::CpuSet::new();
    cpu0.set(0)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu0)?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    let gap = Duration::from_secs_f64(conns as f64 / rate);
    let start = Instant::now();
    struct Conn {
        s: TcpStream,
        due: Instant,
        waiting: bool,
        buf: Vec<u8>,
        have: usize,
    }
    let mut cs: Vec<Conn> = (0..conns)
        .map(|i| -> Result<Conn> {
            let s = TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            s.set_nonblocking(true)?;
            Ok(Conn {
                s,
                due: start + gap.mul_f64(i as f64 / conns as f64),
                waiting: false,
                buf: vec![0; 64 * 1024],
                have: 0,
            })
        })
        .collect::<Result<_>>()?;
    let mut lat = Vec::with_capacity((rate * d.as_secs_f64()) as usize + 16);
    let end = start + d;
    let mut open = conns;
    while open > 0 {
        let now = Instant::now();
        for c in cs.iter_mut() {
            if !c.waiting {
                if c.due > end {
                    continue;
                }
                if now >= c.due {
                    // A short request on an idle keep-alive connection is written whole.
                    c.s.write_all(req.as_bytes())?;
                    c.waiting = true;
                    c.have = 0;
                }
                continue;
            }
            match c.s.read(&mut c.buf[c.have..]) {
                Ok(0) => bail!("the server closed a connection"),
                Ok(n) => {
                    c.have += n;
                    if response_complete(&c.buf[..c.have]) {
                        lat.push(c.due.elapsed().as_secs_f64() * 1e6);
                        c.waiting = false;
                        c.due += gap;
                        if c.due > end {
                            open -= 1;
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    lat.sort_by(f64::total_cmp);
    anyhow::ensure!(!lat.is_empty(), "no responses");
    let q = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)];
    Ok((q(0.5), q(0.99), lat.len()))
}

/// Whether `b` holds one whole HTTP/1.1 response with a Content-Length body.
fn response_complete(b: &[u8]) -> bool {
    let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = std::str::from_utf8(&b[..end]).unwrap_or("");
    let len: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap_or(0))
        })
        .unwrap_or(0);
    b.len() >= end + 4 + len
}
