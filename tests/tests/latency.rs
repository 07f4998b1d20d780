//! Request latency measured in the kernel, checked against a real HTTP server (axum) and a real
//! client: socket-level (request bytes in → first response bytes out, fentry `tcp_sendmsg`) and a
//! uprobe on the handler's work function, found by its demangled Rust path.

use std::{
    io::{Read, Write},
    net::{SocketAddr, SocketAddrV4, TcpListener},
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use axum::{Router, extract::Query, routing::get};
use tokenflow_testbed::{SERVER_ADDR, Testbed, in_netns, traffic::connect_from};
use tokenflow_tests::{agent::Agent, bpf::Misses, privileged};

const PORT: u16 = 5208;
const WORK: Duration = Duration::from_millis(20);

#[derive(serde::Deserialize)]
struct Work {
    ms: u64,
}

/// The handler's synchronous work; the uprobe target.
#[inline(never)]
pub fn busy_work(ms: u64) -> u64 {
    std::thread::sleep(Duration::from_millis(ms));
    std::hint::black_box(ms)
}

async fn handler(Query(w): Query<Work>) -> String {
    let done = tokio::task::spawn_blocking(move || busy_work(w.ms))
        .await
        .unwrap_or(0);
    format!("worked {done} ms\n")
}

/// Runs `server` on its own runtime thread, over a listener made inside the server namespace.
fn serve_on<F, Fut>(listener: TcpListener, server: F) -> std::thread::JoinHandle<()>
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build();
        let Ok(rt) = rt else { return };
        rt.block_on(async move {
            let _ = listener.set_nonblocking(true);
            if let Ok(listener) = tokio::net::TcpListener::from_std(listener) {
                server(listener).await;
            }
        });
    })
}

fn serve(listener: TcpListener) -> std::thread::JoinHandle<()> {
    serve_on(listener, |l| async move {
        let _ = axum::serve(l, Router::new().route("/work", get(handler))).await;
    })
}

/// One keep-alive HTTP/1.1 request; returns the time to the first response byte.
fn request(stream: &mut std::net::TcpStream, ms: u64) -> Result<Duration> {
    let t0 = Instant::now();
    stream.write_all(format!("GET /work?ms={ms} HTTP/1.1\r\nHost: server\r\n\r\n").as_bytes())?;
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf)?;
    let ttfb = t0.elapsed();
    let mut got = buf[..n].to_vec();
    // Read the rest of this response (headers + small body) before the next request.
    while !String::from_utf8_lossy(&got).contains("ms\n") {
        let n = stream.read(&mut buf)?;
        anyhow::ensure!(n > 0, "server closed mid-response");
        got.extend_from_slice(&buf[..n]);
    }
    anyhow::ensure!(
        got.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&got)
    );
    Ok(ttfb)
}

/// Runs of the agent's programs that the kernel skipped during a test. A classic tracepoint
/// (`tcp_probe`, which starts a request's clock) and a uprobe are skipped while the per-CPU
/// `bpf_prog_active` guard is held — by any BPF map syscall on that CPU, the agent's own window
/// reads included — and the kernel counts each skip. A request whose start was skipped has no
/// sample, which the agent cannot help; one missing without a counted skip is the agent's loss.
struct Skipped {
    /// `tcp_probe` and `sock_send_length`: the two events a socket-level sample needs.
    socket: u64,
    uprobe: u64,
}

impl Skipped {
    fn since(before: &Misses) -> Result<Self> {
        use agent_common::programs::{SOCK_SEND, TCP_PROBE, UPROBE_ENTRY, UPROBE_RETURN};
        let now = Misses::now()?;
        Ok(Self {
            socket: now.since(before, TCP_PROBE.0) + now.since(before, SOCK_SEND.0),
            uprobe: now.since(before, UPROBE_ENTRY) + now.since(before, UPROBE_RETURN),
        })
    }
}

/// `n` samples of `what` for `requests`: every one missing is a counted skip.
fn assert_counted(n: u64, requests: u64, skipped: u64, what: &str) {
    assert!(
        n <= requests && requests - n <= skipped,
        "{n} {what} samples for {requests} requests, and the kernel skipped {skipped} runs of the programs they need: \
         each missing sample must be a counted skip"
    );
    if n < requests {
        eprintln!(
            "{} of {requests} {what} samples lost to runs the kernel skipped ({skipped} counted)",
            requests - n
        );
    }
}

#[test]
fn kernel_request_latency_matches_a_real_http_client() -> Result<()> {
    assert_eq!(busy_work(0), 0, "keeps the uprobe target in this binary");
    let Some(_lock) = privileged("kernel_request_latency") else {
        return Ok(());
    };
    let bed = Testbed::create("http")?;
    let addr = SocketAddr::V4(SocketAddrV4::new(SERVER_ADDR, PORT));
    let listener = in_netns(&bed.server, move || TcpListener::bind(addr).context("bind"))?;
    let _server = serve(listener);
    let exe = std::env::current_exe()?;
    let uprobe = format!("{}:latency::busy_work:work", exe.display());
    let netns = format!("/run/netns/{}", bed.server);
    let agent = Agent::start(&[
        "--interval",
        "1s",
        "--netns",
        &netns,
        "--port",
        &PORT.to_string(),
        "--metrics-addr",
        "off",
        "--uprobe",
        &uprobe,
    ])?;
    let before = Misses::now()?;
    let mut stream = connect_from(&bed.client, addr)?;
    stream.set_nodelay(true)?;
    let mut client = Vec::new();
    for _ in 0..30 {
        client.push(request(&mut stream, WORK.as_millis() as u64)?);
    }
    let seen = agent.windows().len();
    let windows = agent.wait_windows(seen + 2, Duration::from_secs(5))?;
    let skipped = Skipped::since(&before)?;

    let (mut n, mut sum) = (0u64, 0u64);
    for l in windows
        .iter()
        .flat_map(|w| &w.request_latency)
        .filter(|l| l.port == PORT)
    {
        n += l.latency.samples;
        sum += l.latency.mean_us * l.latency.samples;
    }
    let (mut pn, mut psum) = (0u64, 0u64);
    for p in windows
        .iter()
        .flat_map(|w| &w.uprobes)
        .filter(|p| p.label == "work")
    {
        pn += p.latency.samples;
        psum += p.latency.mean_us * p.latency.samples;
    }
    let client_mean = client.iter().sum::<Duration>().as_micros() as f64 / client.len() as f64;
    let kernel_mean = sum as f64 / n.max(1) as f64;
    let probe_mean = psum as f64 / pn.max(1) as f64;
    eprintln!(
        "30 requests: client TTFB mean {client_mean:.0} µs; kernel socket-level {n} × {kernel_mean:.0} µs; uprobe {pn} × {probe_mean:.0} µs"
    );
    assert_counted(n, 30, skipped.socket, "socket-level");
    assert_counted(pn, 30, skipped.uprobe, "uprobe");
    assert!(
        kernel_mean <= client_mean,
        "the kernel sees the request later and the response earlier"
    );
    assert!(
        client_mean - kernel_mean <= 1000.0 + 0.1 * client_mean,
        "kernel {kernel_mean} vs client {client_mean}"
    );
    assert!(
        probe_mean <= kernel_mean,
        "the handler's work lies inside the request"
    );
    assert!(
        probe_mean >= WORK.as_micros() as f64,
        "the work sleeps {WORK:?}"
    );
    Ok(())
}

mod grpc {
    tonic::include_proto!("tokenflow.test");
}

struct Worker;

#[tonic::async_trait]
impl grpc::worker_server::Worker for Worker {
    async fn work(
        &self,
        req: tonic::Request<grpc::WorkRequest>,
    ) -> Result<tonic::Response<grpc::WorkReply>, tonic::Status> {
        let ms = req.into_inner().ms;
        let worked_ms = tokio::task::spawn_blocking(move || busy_work(ms))
            .await
            .map_err(|e| tonic::Status::internal(e.to_string()))?;
        Ok(tonic::Response::new(grpc::WorkReply { worked_ms }))
    }
}

fn serve_grpc(listener: TcpListener) -> std::thread::JoinHandle<()> {
    serve_on(listener, |l| async move {
        let _ = tonic::transport::Server::builder()
            .add_service(grpc::worker_server::WorkerServer::new(Worker))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(l))
            .await;
    })
}

#[test]
fn kernel_request_latency_matches_a_real_grpc_client() -> Result<()> {
    assert_eq!(busy_work(0), 0, "keeps the uprobe target in this binary");
    let Some(_lock) = privileged("kernel_request_latency_grpc") else {
        return Ok(());
    };
    let bed = Testbed::create("grpc")?;
    let port = PORT + 1;
    let addr = SocketAddr::V4(SocketAddrV4::new(SERVER_ADDR, port));
    let listener = in_netns(&bed.server, move || TcpListener::bind(addr).context("bind"))?;
    let _server = serve_grpc(listener);
    let uprobe = format!(
        "{}:latency::busy_work:work",
        std::env::current_exe()?.display()
    );
    let netns = format!("/run/netns/{}", bed.server);
    let agent = Agent::start(&[
        "--interval",
        "1s",
        "--netns",
        &netns,
        "--port",
        &port.to_string(),
        "--metrics-addr",
        "off",
        "--uprobe",
        &uprobe,
    ])?;
    let before = Misses::now()?;
    // The client runs on a thread inside the client namespace, so its connection is made there.
    let (measured_from_ms, client) = in_netns(&bed.client, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let mut c =
                grpc::worker_client::WorkerClient::connect(format!("http://{addr}")).await?;
            // One call to set the HTTP/2 connection up, then the measured ones.
            c.work(grpc::WorkRequest { ms: 0 }).await?;
            // Far enough apart that no window holds both the set-up and a measured call, even when
            // a loaded machine stretches windows.
            tokio::time::sleep(Duration::from_millis(2500)).await;
            let measured_from_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)?
                .as_millis() as u64;
            let mut times = Vec::new();
            for _ in 0..30 {
                let t0 = Instant::now();
                let r = c
                    .work(grpc::WorkRequest {
                        ms: WORK.as_millis() as u64,
                    })
                    .await?;
                times.push(t0.elapsed());
                anyhow::ensure!(r.into_inner().worked_ms == WORK.as_millis() as u64);
            }
            Ok::<_, anyhow::Error>((measured_from_ms, times))
        })
    })?;
    let seen = agent.windows().len();
    let windows = agent.wait_windows(seen + 2, Duration::from_secs(5))?;
    let skipped = Skipped::since(&before)?;
    // Only windows that end after the measured calls began: the set-up call lies in earlier ones.
    let lat: Vec<_> = windows
        .iter()
        .filter(|w| w.end_unix_ms > measured_from_ms)
        .flat_map(|w| &w.request_latency)
        .filter(|l| l.port == port)
        .collect();
    let slow = &lat;
    let n: u64 = slow.iter().map(|l| l.latency.samples).sum();
    let kernel_mean = slow
        .iter()
        .map(|l| l.latency.mean_us * l.latency.samples)
        .sum::<u64>() as f64
        / n.max(1) as f64;
    let client_mean = client.iter().sum::<Duration>().as_micros() as f64 / client.len() as f64;
    eprintln!("gRPC: client mean {client_mean:.0} µs; kernel windows {lat:?}");
    assert_counted(n, 30, skipped.socket, "socket-level");
    assert!(kernel_mean <= client_mean);
    assert!(
        client_mean - kernel_mean <= 1000.0 + 0.1 * client_mean,
        "kernel {kernel_mean} vs client {client_mean}"
    );
    Ok(())
}

/// One non-streaming completion; returns the backend's own queue and prefill times (ms) from its
/// `x-queue-time-ms` / `x-prefill-time-ms` headers.
fn completion(addr: SocketAddr, model: &str) -> Result<(f64, f64)> {
    let body = serde_json::json!({"model": model, "prompt": "a request that waits its turn", "max_tokens": 24, "seed": 3})
        .to_string();
    let (status, head, resp) = tokenflow_tests::hint_server::http_with_head(
        addr,
        "POST",
        "/v1/completions",
        None,
        Some(&body),
    )?;
    anyhow::ensure!(status == 200, "{status}: {resp}");
    let header = |name: &str| -> Result<f64> {
        head.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case(name)
                    .then(|| v.trim().parse().ok())?
            })
            .with_context(|| format!("no {name} header in {head}"))
    };
    Ok((header("x-queue-time-ms")?, header("x-prefill-time-ms")?))
}

/// `--span` pairs the backend's markers by request id across its HTTP and engine threads: the
/// queueing and prefill the agent measures in the kernel agree with what the backend reports for
/// the same requests.
#[test]
fn spans_split_the_backends_time_to_first_token() -> Result<()> {
    let Some(_lock) = privileged("backend_spans") else {
        return Ok(());
    };
    let dir = std::env::temp_dir().join(format!("tf-spans-{}", std::process::id()));
    let model_dir = tokenflow_tests::backend::tiny_model(&dir)?;
    let port = tokenflow_tests::redis_server::free_port()?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    // One running sequence at a time, so concurrent requests queue behind each other.
    let _backend = tokenflow_tests::backend::serve(&model_dir, addr, &["--max-running", "1"])?;
    let model = tokenflow_tests::backend::ready_model(addr)?;
    let bin = tokenflow_tests::agent::sibling_binary("tokenflow-backend")?;
    let span = |a: &str, b: &str, label: &str| {
        format!(
            "{}:tokenflow_backend_{a}..tokenflow_backend_{b}:{label}",
            bin.display()
        )
    };
    let agent = Agent::start(&[
        "--interval",
        "1s",
        "--port",
        &port.to_string(),
        "--metrics-addr",
        "off",
        "--span",
        &span("request_start", "scheduled", "queue"),
        "--span",
        &span("scheduled", "first_token", "prefill"),
    ])?;
    const N: usize = 6;
    let reported: Vec<(f64, f64)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..N)
            .map(|_| s.spawn(|| completion(addr, &model)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().map_err(|_| anyhow::anyhow!("client panicked"))?)
            .collect::<Result<_>>()
    })?;
    let seen = agent.windows().len();
    let windows = agent.wait_windows(seen + 2, Duration::from_secs(5))?;
    let span_total = |label: &str| -> (u64, f64) {
        windows
            .iter()
            .flat_map(|w| &w.uprobes)
            .filter(|p| p.label == label)
            .fold((0, 0.0), |(n, sum), p| {
                (
                    n + p.latency.samples,
                    sum + (p.latency.mean_us * p.latency.samples) as f64 / 1000.0,
                )
            })
    };
    let (qn, q_ms) = span_total("queue");
    let (pn, p_ms) = span_total("prefill");
    let q_reported: f64 = reported.iter().map(|r| r.0).sum();
    let p_reported: f64 = reported.iter().map(|r| r.1).sum();
    eprintln!(
        "{N} requests: queue {qn} spans, {q_ms:.1} ms in all (backend says {q_reported:.1}); prefill {pn} spans, {p_ms:.1} ms (backend says {p_reported:.1})"
    );
    assert_eq!(
        (qn, pn),
        (N as u64, N as u64),
        "one span of each per request"
    );
    assert!(
        q_reported > 0.0,
        "with one running slot, {N} concurrent requests must queue"
    );
    // The markers sit next to the backend's own clock reads: the sums agree to within a
    // millisecond per request plus the histogram's rounding (a few per cent).
    for (what, kernel, backend) in [("queue", q_ms, q_reported), ("prefill", p_ms, p_reported)] {
        assert!(
            (kernel - backend).abs() <= N as f64 * 1.0 + 0.05 * backend,
            "{what}: kernel {kernel:.1} ms vs backend {backend:.1} ms"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
