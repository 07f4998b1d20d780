use std::{
    io::Write,
    path::PathBuf,
    process::ExitCode,
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use clap::{Parser, Subcommand};
use tokenflow_pacer::{
    gate::Limit,
    hints::HintSource,
    prompts::Prompts,
    run::{Load, Pacing, RunConfig, run},
    summary::summarize,
};

/// Sends prompts to an OpenAI-compatible LLM server (vLLM, tokenflow-backend) — unpaced, at a
/// fixed rate, or at the rate TokenFlow's hint server allows — and records what users feel:
/// time waiting in the pacer, TTFT from submission, inter-token latency, end-to-end latency.
#[derive(Parser)]
#[command(name = "tokenflow-pacer", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a workload and write a JSON summary and JSONL of every request.
    Run(Box<Args>),
    /// Time the gate per request (used by `cargo xtask bench`).
    #[command(hide = true)]
    BenchGate,
}

#[derive(clap::Args)]
struct Args {
    /// Server base URL, `URL` or `URL#NODE`. Repeat for several backends (a node each, as vLLM
    /// replicas): each request goes to the healthy one with the fewest tokens in flight,
    /// health-checked every second, and a request whose backend fails before its first token
    /// (refused, timed out, 5xx) moves to another one, once. With `#NODE` on every target and
    /// `--pacing hints:URL`, the pacer follows one hint per node (client `CLIENT_ID.NODE`): the
    /// rate it obeys is their sum, and a backend competes on tokens in flight only while it has
    /// been sent less than its node allows, so a congested node gets what its hint allows.
    #[arg(long, required = true)]
    target: Vec<String>,
    #[arg(long)]
    model: String,
    /// Closed loop: this many users, each sending again when its answer ends (1–100).
    #[arg(long, conflicts_with = "rate", value_parser = clap::value_parser!(u32).range(1..=100))]
    users: Option<u32>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// `off`, `fixed:RATE` (requests/s) or `hints:URL` (hint server base URL).
    #[arg(long, default_value = "off")]
    pacing: String,
    /// Concurrency cap for fixed pacing.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Leave the sockets' kernel pacing alone. By default, when pacing is on, each connection's
    /// SO_MAX_PACING_RATE follows the allowed rate (requests/s × mean request bytes × 1.2), so a
    /// long prompt leaves as a paced stream instead of a line-rate burst into the bottleneck.
    #[arg(long)]
    no_socket_pacing: bool,
    /// Shed a request that has waited this long in the pacer: it is recorded (error "shed", no
    /// TTFT, never goodput) and not sent. Under overload a bounded wait keeps the requests that
    /// do go inside their latency objective, instead of making every one of them late.
    #[arg(long, value_parser = humantime::parse_duration, value_name = "DURATION")]
    max_wait: Option<Duration>,
    /// This client's id at the hint server.
    #[arg(long, default_value = "pacer")]
    client_id: String,
    /// `interactive` or `batch` (registered at the hint server with --hint-token).
    #[arg(long, default_value = "interactive")]
    class: String,
    /// Bearer token for the hint server's writes: registering this client (PUT /v1/clients/{id},
    /// with --node-id or `URL#NODE` targets) and reporting how many requests it has dispatched,
    /// ten times a second (POST /v1/clients/{id}/dispatched), which each hint's reason then
    /// states beside the allowance.
    #[arg(long, env = "TOKENFLOW_HINT_TOKEN", hide_env_values = true)]
    hint_token: Option<String>,
    /// Node whose telemetry governs this client (for registration; with `URL#NODE` targets each
    /// node's client is registered on its own node instead).
    #[arg(long)]
    node_id: Option<String>,
    /// Rate and concurrency used while no fresh hint is at hand.
    #[arg(long, default_value_t = 1.0)]
    safe_rps: f64,
    #[arg(long, default_value_t = 2)]
    safe_concurrency: usize,
    /// Size of synthetic prompts in bytes (50000–200000 for long-context profiles).
    #[arg(long, default_value_t = 400)]
    prompt_bytes: usize,
    /// JSONL prompts (`{"prompt": …}` or ShareGPT conversations) instead of synthetic ones.
    #[arg(long)]
    prompts: Option<PathBuf>,
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Ask the server to keep only the prompt's last K tokens (vLLM's `truncate_prompt_tokens`):
    /// long-context uploads still load the link in full while a short-context model serves them.
    #[arg(long, value_name = "K")]
    truncate_prompt_tokens: Option<u32>,
    /// Ask the server to generate exactly --max-tokens, past its end-of-sequence token (vLLM's
    /// `ignore_eos`, as its serving benchmark uses), so output lengths do not vary between runs.
    #[arg(long)]
    ignore_eos: bool,
    /// Retries after 429 or a refused connection, per request.
    #[arg(long, default_value_t = 2)]
    retries: u32,
    #[arg(long, default_value = "120s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// TTFT objective for goodput, milliseconds.
    #[arg(long, default_value_t = 1000.0)]
    slo_ttft_ms: f64,
    /// Output folder (default results/pacer-<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Print the summary as JSON only.
    #[arg(long)]
    json: bool,
    /// Serve Prometheus metrics here while the run lasts (`tokenflow_pacer_*`: requests by
    /// outcome, wait/TTFT/inter-token/end-to-end latency from submission, the limit obeyed).
    #[arg(long, env = "TOKENFLOW_PACER_METRICS", value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let r = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|rt| match Cli::parse().cmd {
            Cmd::Run(a) => rt.block_on(main_run(*a)),
            Cmd::BenchGate => {
                let (free, queued) = rt.block_on(tokenflow_pacer::gate::bench(100_000));
                println!(
                    "{}",
                    serde_json::json!({ "us_per_request": free, "us_per_request_queued": queued })
                );
                Ok(())
            }
        });
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenflow-pacer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn pacing(a: &Args) -> anyhow::Result<Pacing> {
    let safe = Limit {
        rate: a.safe_rps,
        concurrency: a.safe_concurrency.max(1),
    };
    Ok(match a.pacing.split_once(':') {
        None if a.pacing == "off" => Pacing::Off,
        Some(("fixed", r)) => Pacing::Fixed(
            r.parse()
                .map_err(|_| anyhow::anyhow!("--pacing fixed:RATE: `{r}` is not a number"))?,
        ),
        Some(("hints", url)) => Pacing::Hints(HintSource {
            url: url.trim_end_matches('/').to_string(),
            client_id: a.client_id.clone(),
            safe,
            token: a.hint_token.clone(),
        }),
        _ => anyhow::bail!(
            "--pacing: `{}` is not off, fixed:RATE or hints:URL",
            a.pacing
        ),
    })
}

async fn main_run(a: Args) -> anyhow::Result<()> {
    let pacing = pacing(&a)?;
    if let (Pacing::Hints(src), Some(token)) = (&pacing, &a.hint_token) {
        // Checked before anything is registered: a bad --target registers nothing.
        let (_, nodes) = tokenflow_pacer::route::parse_targets(&a.target)?;
        // One client per backend node, or this client on the node --node-id names.
        // Without a node the client is registered by someone else (the token still reports).
        let clients: Vec<(String, String)> = if nodes.is_empty() {
            a.node_id
                .iter()
                .map(|node| (a.client_id.clone(), node.clone()))
                .collect()
        } else {
            nodes
                .into_iter()
                .map(|n| (tokenflow_pacer::hints::node_client(&a.client_id, &n), n))
                .collect()
        };
        for (client, node) in clients {
            let r = reqwest::Client::new()
                .put(format!("{}/v1/clients/{client}", src.url))
                .bearer_auth(token)
                .json(&serde_json::json!({"node_id": node, "class": a.class}))
                .send()
                .await?;
            anyhow::ensure!(
                r.status().is_success(),
                "registering {client} at the hint server: {}",
                r.text().await.unwrap_or_default()
            );
        }
    }
    let load = match (a.users, a.rate) {
        (Some(u), None) => Load::Closed { users: u as usize },
        (None, Some(r)) if r > 0.0 => Load::Open { rate: r },
        _ => anyhow::bail!("give --users N (closed loop) or --rate R (open loop)"),
    };
    let prompts = Arc::new(match &a.prompts {
        Some(p) => Prompts::from_jsonl(p)?,
        None => Prompts::synthetic(a.prompt_bytes, 64, 1),
    });
    let cfg = RunConfig {
        targets: a.target.iter().map(|t| t.to_string()).collect(),
        model: a.model.clone(),
        load,
        duration: a.duration,
        max_tokens: a.max_tokens,
        truncate_prompt_tokens: a.truncate_prompt_tokens,
        ignore_eos: a.ignore_eos,
        pacing,
        class: a.class.clone(),
        retries: a.retries,
        timeout: a.timeout,
        concurrency: a.concurrency,
        socket_pacing: !a.no_socket_pacing,
        max_wait: a.max_wait,
    };
    if let Some(addr) = a.metrics_addr {
        tokenflow_pacer::metrics::install(addr)?;
    }
    let export = a.metrics_addr.is_some();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let t0 = Instant::now();
    let running = run(cfg, prompts, tx).await?;
    let bar = (!a.json).then(|| {
        let b = indicatif::ProgressBar::new(a.duration.as_secs());
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} s {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    });
    let mut records = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tokio::select! {
            r = rx.recv() => match r {
                Some(r) => {
                    if export {
                        tokenflow_pacer::metrics::record(&r);
                    }
                    records.push(r);
                }
                None => break,
            },
            _ = tick.tick() => {
                if export {
                    let in_flight = running.in_flight();
                    tokenflow_pacer::metrics::gate(running.gate.limit(), running.gate.waiting(), in_flight);
                }
                if let Some(b) = &bar {
                    b.set_position(t0.elapsed().as_secs().min(a.duration.as_secs()));
                    let s = summarize(&records, t0.elapsed().as_secs_f64(), a.slo_ttft_ms);
                    let l = running.gate.limit();
                    b.set_message(format!("{:.1} req/s, TTFT p99 {:.0} ms, limit {} req/s, waiting {}", s.requests_per_s, s.ttft.p99_ms,
                        if l.rate.is_finite() { format!("{:.1}", l.rate) } else { "∞".into() }, running.gate.waiting()));
                }
                if t0.elapsed() > a.duration + a.timeout {
                    break;
                }
            }
        }
    }
    drop(running);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let s = summarize(&records, a.duration.as_secs_f64(), a.slo_ttft_ms);
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from("results").join(format!(
            "pacer-{}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        ))
    });
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("summary.json"), serde_json::to_vec_pretty(&s)?)?;
    let mut f = std::io::BufWriter::new(std::fs::File::create(out.join("requests.jsonl"))?);
    for r in &records {
        serde_json::to_writer(&mut f, r)?;
        f.write_all(b"\n")?;
    }
    f.flush()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
    } else {
        println!(
            "{} requests ({} ok, {} errors, {} × 429, {} shed) in {:.0} s: {:.2} req/s, {:.1} tokens/s, goodput {:.2} req/s (TTFT ≤ {} ms)",
            s.requests,
            s.ok,
            s.errors,
            s.rejected_429,
            s.shed,
            s.duration_s,
            s.requests_per_s,
            s.tokens_per_s,
            s.goodput_per_s,
            s.slo_ttft_ms
        );
        for (name, p) in [
            ("TTFT (from submit)", &s.ttft),
            ("TTFT (from send)", &s.ttft_from_send),
            ("inter-token", &s.inter_token),
            ("end-to-end", &s.e2e),
            ("pacer wait", &s.pacer_wait),
        ] {
            println!(
                "  {name:<20} p50 {:>8.1} ms  p95 {:>8.1} ms  p99 {:>8.1} ms",
                p.p50_ms, p.p95_ms, p.p99_ms
            );
        }
        println!(
            "written to {}/summary.json and requests.jsonl",
            out.display()
        );
    }
    Ok(())
}
