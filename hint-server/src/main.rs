use std::{net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use tokenflow_hint_server::{
    evaluate,
    model::{Models, calm_mask},
    serve::{self, Settings, unix_ms},
    trace::Trace,
};
use tokenflow_schema::store::Target;

/// TokenFlow's hint server: reads the agents' telemetry windows from Redis, scores them with an
/// Isolation Forest, forecasts the p95 RTT with a GBDT, and turns both into per-client rate
/// limits served as JSON (GET /v1/hints/{client_id}).
#[derive(Parser)]
#[command(name = "tokenflow-hint-server", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Serve hints (see `serve --help`).
    Serve(ServeArgs),
    /// Train the models on a recorded trace and write a versioned model file.
    Train {
        /// Trace recorded by `cargo xtask record-trace`.
        #[arg(long)]
        trace: PathBuf,
        #[arg(long, default_value = "tokenflow-models.json")]
        out: PathBuf,
        /// Fit the Isolation Forest on the windows labelled normal (default: on windows that look
        /// calm, as the online refit does, ignoring the labels).
        #[arg(long)]
        use_labels: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Score every model on a recorded trace (time-ordered split) and every controller on the
    /// plant simulation; writes report.json, report.svg and anomaly_rows.csv.
    Evaluate {
        /// Trace recorded by `cargo xtask record-trace`.
        #[arg(long)]
        trace: PathBuf,
        #[arg(long, default_value = "results/evaluation")]
        out: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// SIMULATOR for scale tests: write synthetic windows of many nodes to Redis as agents would
    /// (node ids `sim-node-NNNNN`, GPU provider "simulated") and register one client per node.
    SimulateNodes {
        #[command(flatten)]
        redis: RedisArgs,
        #[arg(long, default_value_t = 1000)]
        nodes: usize,
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: Duration,
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        duration: Duration,
        /// Do not register a client per node.
        #[arg(long)]
        no_clients: bool,
    },
    /// Time one decision per window of a trace (used by `cargo xtask bench`).
    #[command(hide = true)]
    BenchDecision {
        #[arg(long)]
        trace: PathBuf,
    },
}

/// Where Redis is.
#[derive(clap::Args)]
struct RedisArgs {
    /// Redis holding the agents' streams, the client settings and the hints; with
    /// --redis-cluster, one or more comma-separated seed nodes of a Redis Cluster.
    #[arg(
        long,
        env = "TOKENFLOW_REDIS",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis: String,
    /// --redis names a Redis Cluster: writes go per hash slot and each node's stream is read on
    /// its own slot.
    #[arg(long, env = "TOKENFLOW_REDIS_CLUSTER")]
    redis_cluster: bool,
}

impl RedisArgs {
    fn target(&self) -> anyhow::Result<Target> {
        Target::parse(&self.redis, self.redis_cluster).map_err(|e| anyhow::anyhow!("--redis: {e}"))
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    #[command(flatten)]
    redis: RedisArgs,
    /// Address of the HTTP API.
    #[arg(long, env = "TOKENFLOW_HINT_LISTEN", default_value = "127.0.0.1:8700")]
    listen: SocketAddr,
    /// Prometheus /metrics address, or `off`.
    #[arg(long, env = "TOKENFLOW_HINT_METRICS", default_value = "127.0.0.1:9465")]
    metrics_addr: String,
    /// Bearer token required for writes (PUT /v1/clients/…). Without one, writes are refused.
    #[arg(long, env = "TOKENFLOW_HINT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Require the token for reads too.
    #[arg(long, env = "TOKENFLOW_HINT_AUTH_READS")]
    auth_reads: bool,
    /// The agents' window interval; input older than 3 intervals is stale.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    interval: Duration,
    /// Model file: loaded at start when present, rewritten after every refit.
    #[arg(long, env = "TOKENFLOW_HINT_MODEL")]
    model: Option<PathBuf>,
    /// How often the models are refitted in the background.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    refit_every: Duration,
    /// Newest windows per node the refit trains on.
    #[arg(long, default_value_t = 1800)]
    train_windows: usize,
    /// Tokio worker threads (default: one per CPU).
    #[arg(long)]
    workers: Option<usize>,
    /// Name of this replica in the Redis consumer group, one per replica (default: host name and
    /// pid). In a Redis Cluster the replicas alive split the nodes between them by name.
    #[arg(long, env = "TOKENFLOW_HINT_CONSUMER")]
    consumer: Option<String>,
    /// Folder of `cargo xtask demo` reports the dashboard's A/B view opens (`/ui`).
    #[arg(long, env = "TOKENFLOW_HINT_RESULTS", default_value = "results")]
    results: PathBuf,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Serve(a) => run_serve(a),
        Cmd::Train {
            trace,
            out,
            use_labels,
            seed,
        } => train(&trace, &out, use_labels, seed),
        Cmd::SimulateNodes {
            redis,
            nodes,
            interval,
            duration,
            no_clients,
        } => redis.target().and_then(|redis| {
            simulate_nodes(tokenflow_hint_server::simulate::SimSettings {
                redis,
                nodes,
                interval,
                duration,
                clients: !no_clients,
            })
        }),
        Cmd::BenchDecision { trace } => {
            tokenflow_hint_server::bench::decision(&trace).map(|v| println!("{v}"))
        }
        Cmd::Evaluate { trace, out, seed } => evaluate::evaluate(&trace, seed).and_then(|e| {
            evaluate::write(&e, &out)?;
            println!("{}", serde_json::to_string_pretty(&e.report)?);
            eprintln!(
                "report written to {}/report.json and report.svg",
                out.display()
            );
            Ok(())
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tokenflow-hint-server: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn simulate_nodes(s: tokenflow_hint_server::simulate::SimSettings) -> anyhow::Result<()> {
    eprintln!(
        "simulating {} nodes (SYNTHETIC windows, ids sim-node-*) every {:?} for {:?} into {}",
        s.nodes, s.interval, s.duration, s.redis
    );
    let rt = tokio::runtime::Runtime::new()?;
    let written = rt.block_on(tokenflow_hint_server::simulate::run(&s, |seq, n| {
        if seq % 10 == 0 {
            eprintln!("  {seq} intervals, {n} windows each");
        }
    }))?;
    eprintln!("wrote {written} synthetic windows");
    Ok(())
}

fn run_serve(a: ServeArgs) -> anyhow::Result<()> {
    let metrics = match a.metrics_addr.as_str() {
        "off" => None,
        s => Some(
            s.parse()
                .map_err(|_| anyhow::anyhow!("--metrics-addr: `{s}` is not ADDR:PORT or `off`"))?,
        ),
    };
    let consumer = a.consumer.unwrap_or_else(|| {
        let host = nix::unistd::gethostname()
            .ok()
            .and_then(|h| h.into_string().ok())
            .unwrap_or_else(|| "host".into());
        format!("{host}-{}", std::process::id())
    });
    let workers = a.workers;
    let settings = Settings {
        redis: a.redis.target()?,
        listen: a.listen,
        metrics,
        token: a.token.filter(|t| !t.is_empty()),
        auth_reads: a.auth_reads,
        interval: a.interval,
        model: a.model,
        refit_every: a.refit_every,
        train_windows: a.train_windows,
        consumer,
        results: Some(a.results),
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers {
        rt.worker_threads(n.max(1));
    }
    rt.enable_all().build()?.block_on(serve::serve(settings))
}

fn train(
    trace: &std::path::Path,
    out: &std::path::Path,
    use_labels: bool,
    seed: u64,
) -> anyhow::Result<()> {
    let t = Trace::load(trace)?;
    let baseline: Vec<bool> = if use_labels {
        t.anomalous.iter().map(|a| !a).collect()
    } else {
        calm_mask(&t.features)
    };
    let t0 = std::time::Instant::now();
    let m = Models::train(&t.features, &baseline, seed, unix_ms())?;
    m.save(out)?;
    eprintln!(
        "trained on {} windows ({} as the normal baseline) in {:.2} s; model written to {}",
        m.rows,
        m.baseline_rows,
        t0.elapsed().as_secs_f64(),
        out.display()
    );
    Ok(())
}
