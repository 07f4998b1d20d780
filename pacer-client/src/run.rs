//! Workloads: a closed loop of N users, or open-loop Poisson arrivals; each request passes the
//! pacing gate before it is sent, and is timed from the moment the user submitted it.

use std::{
    sync::{Arc, Mutex, atomic::Ordering},
    time::{Duration, Instant},
};

use anyhow::Result;
use tokio::sync::mpsc;

use crate::{
    client::{Attempt, Call, Record, attempt, itl, jitter, ms},
    gate::{Gate, Limit},
    hints::{HintSource, Latest, NodeLimits, dispatched_to, follow, node_client},
    prompts::Prompts,
    route::{self, Target, health_checks},
    socket::{HttpClient, SocketPacing, Uploads, http_client},
};

#[derive(Clone, Debug)]
pub enum Pacing {
    Off,
    Fixed(f64),
    Hints(HintSource),
}

#[derive(Clone, Debug)]
pub enum Load {
    /// N users, each sending its next request when the previous one ends.
    Closed { users: usize },
    /// Poisson arrivals at this many requests per second.
    Open { rate: f64 },
}

#[derive(Clone, Debug)]
pub struct RunConfig {
    pub targets: Vec<String>,
    pub model: String,
    pub load: Load,
    pub duration: Duration,
    pub max_tokens: u32,
    pub truncate_prompt_tokens: Option<u32>,
    pub ignore_eos: bool,
    pub pacing: Pacing,
    pub class: String,
    pub retries: u32,
    pub timeout: Duration,
    /// Concurrency cap for `fixed` pacing.
    pub concurrency: usize,
    /// Cap each connection's send rate (`SO_MAX_PACING_RATE`) at the paced request rate times
    /// the mean request's wire size times [`SOCKET_PACING_HEADROOM`]. Off when pacing is off.
    pub socket_pacing: bool,
    /// Shed a request that has waited this long in the pacer (`None`: wait as long as it takes).
    pub max_wait: Option<Duration>,
}

/// The uploads in progress together may send this much faster than the request rate's byte
/// equivalent: a lone request's upload then takes a little less than the gap to the next, and the
/// client's bytes reach the bottleneck as a stream near its allowed rate instead of line-rate
/// bursts.
pub const SOCKET_PACING_HEADROOM: f64 = 1.2;

/// Bytes on the wire for a prompt of `prompt_bytes`: the JSON body's other fields and the HTTP
/// head (~400 bytes), then TCP/IP headers (~4 % at a 1448-byte MSS).
pub fn wire_bytes(prompt_bytes: f64) -> f64 {
    (prompt_bytes + 400.0) * 1.04
}

/// The per-socket byte rate for a request rate, shared by `uploads` in progress (`None`: no cap).
/// Shared, not each at the whole: where uploads overlap — a narrowed link makes each take longer
/// than the gap to the next — sockets each allowed the whole rate send a multiple of it into the
/// bottleneck's queue. (On the test bed's 20 → 5 Mbit/s step, per socket the narrowed link's p95
/// settled back within ±20 % of the setpoint in 6, 4, 7, 4, 6 periods and not within the step in
/// three of eight repeats; shared, in 6, 4, 2, 4, 3, 4, 2 and one not.)
pub fn socket_rate(rate_rps: f64, prompt_bytes: f64, uploads: usize) -> Option<u64> {
    (rate_rps.is_finite() && rate_rps > 0.0).then(|| {
        (rate_rps * wire_bytes(prompt_bytes) * SOCKET_PACING_HEADROOM / uploads.max(1) as f64)
            .ceil() as u64
    })
}

pub struct Running {
    pub gate: Arc<Gate>,
    pub sockets: Arc<SocketPacing>,
    pub latest: Arc<Mutex<Latest>>,
    pub targets: Arc<Vec<Target>>,
}

impl Running {
    /// Requests in flight on every target.
    pub fn in_flight(&self) -> usize {
        self.targets
            .iter()
            .map(|t| t.requests.load(Ordering::Relaxed))
            .sum()
    }
}

pub async fn run(
    cfg: RunConfig,
    prompts: Arc<Prompts>,
    records: mpsc::UnboundedSender<Record>,
) -> Result<Running> {
    anyhow::ensure!(!cfg.targets.is_empty(), "give at least one --target");
    let limit = match &cfg.pacing {
        Pacing::Off => Limit::UNLIMITED,
        Pacing::Fixed(r) => Limit {
            rate: *r,
            concurrency: cfg.concurrency,
        },
        // Until the first hint arrives: the safe floor.
        Pacing::Hints(src) => src.safe,
    };
    let gate = Gate::new(limit);
    let latest = Arc::new(Mutex::new(Latest::default()));
    let (targets, nodes) = route::parse_targets(&cfg.targets)?;
    let targets: Arc<Vec<Target>> = Arc::new(targets);
    if let Pacing::Hints(src) = &cfg.pacing {
        if nodes.is_empty() {
            tokio::spawn(follow(
                src.clone(),
                gate.clone(),
                latest.clone(),
                Some(dispatched_to(targets.clone(), None)),
            ));
        } else {
            // One hint per node; the safe floor is shared out, so a dead hint server still
            // leaves the pacer at the floor in all.
            let n = nodes.len();
            let safe = Limit {
                rate: src.safe.rate / n as f64,
                concurrency: (src.safe.concurrency / n).max(1),
            };
            let shares = NodeLimits::new(gate.clone(), targets.clone(), safe);
            for node in &nodes {
                let per_node = HintSource {
                    client_id: node_client(&src.client_id, node),
                    safe,
                    ..src.clone()
                };
                tokio::spawn(follow(
                    per_node,
                    shares.node(node),
                    Arc::new(Mutex::new(Latest::default())),
                    Some(dispatched_to(targets.clone(), Some(node.clone()))),
                ));
            }
        }
    }
    let sockets = SocketPacing::new();
    let http = http_client(sockets.clone());
    let uploads = Uploads::new();
    if cfg.socket_pacing && !matches!(cfg.pacing, Pacing::Off) {
        // Follows the gate, whoever set it (hint, watchdog's floor, fixed rate), and the uploads
        // in progress as each starts and ends.
        let (gate, sockets, bytes, uploads) = (
            gate.clone(),
            sockets.clone(),
            prompts.mean_bytes(),
            uploads.clone(),
        );
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(50));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = uploads.changed() => {}
                }
                sockets.set_rate(socket_rate(gate.limit().rate, bytes, uploads.count()));
            }
        });
    }
    let start = Instant::now();
    let deadline = start + cfg.duration;
    if targets.len() > 1 {
        tokio::spawn(health_checks(targets.clone()));
    }
    let ctx = Arc::new(Ctx {
        cfg: cfg.clone(),
        gate: gate.clone(),
        http,
        prompts,
        records,
        targets: targets.clone(),
        uploads,
        start,
    });
    match cfg.load {
        Load::Closed { users } => {
            for u in 0..users {
                let ctx = ctx.clone();
                tokio::spawn(async move {
                    while Instant::now() < deadline {
                        one(&ctx, u, Instant::now()).await;
                    }
                });
            }
        }
        Load::Open { rate } => {
            tokio::spawn(async move {
                let mut next = Instant::now();
                let mut n = 0usize;
                while next < deadline {
                    tokio::time::sleep_until(next.into()).await;
                    // The request was submitted when it was due, however late this task woke.
                    let ctx = ctx.clone();
                    tokio::spawn(async move { one(&ctx, n, next).await });
                    n += 1;
                    let gap = -(1.0 - fastrand::f64()).ln() / rate.max(1e-9);
                    next += Duration::from_secs_f64(gap);
                }
            });
        }
    }
    Ok(Running {
        gate,
        sockets,
        latest,
        targets,
    })
}

/// What every request of a run shares.
struct Ctx {
    cfg: RunConfig,
    gate: Arc<Gate>,
    http: HttpClient,
    prompts: Arc<Prompts>,
    records: mpsc::UnboundedSender<Record>,
    targets: Arc<Vec<Target>>,
    uploads: Arc<Uploads>,
    start: Instant,
}

/// One request: through the gate, to the least busy target, recorded from `submitted`.
async fn one(ctx: &Ctx, user: usize, submitted: Instant) {
    let cfg = &ctx.cfg;
    // A request still waiting in the gate when the run and one timeout have passed is recorded
    // as unsent, so that no submitted request goes missing from the results.
    let give_up = ctx.start + cfg.duration + cfg.timeout;
    let deadline = cfg
        .max_wait
        .map_or(give_up, |w| (submitted + w).min(give_up));
    let Some(permit) = ctx.gate.acquire_until(deadline).await else {
        let now = Instant::now();
        let error = if deadline < give_up {
            format!(
                "{} waited {} ms in the pacer (--max-wait)",
                crate::summary::SHED,
                ms(now - submitted).round()
            )
        } else {
            "not sent: still waiting in the pacer when the run ended".to_string()
        };
        let _ = ctx.records.send(Record {
            user,
            class: cfg.class.clone(),
            target: String::new(),
            submitted_ms: ms(submitted - ctx.start),
            wait_ms: ms(now - submitted),
            ttft_ms: None,
            ttft_sent_ms: None,
            itl_ms: Vec::new(),
            e2e_ms: ms(now - submitted),
            tokens_in: 0,
            tokens_out: 0,
            status: 0,
            error: Some(error),
            retries: 0,
        });
        return;
    };
    let sent = Instant::now();
    let prompt = ctx.prompts.pick();
    let (a, retries, t) = send(ctx, &prompt).await;
    drop(permit);
    let end = Instant::now();
    let _ = ctx.records.send(Record {
        user,
        class: cfg.class.clone(),
        target: ctx.targets[t].url.clone(),
        submitted_ms: ms(submitted - ctx.start),
        wait_ms: ms(sent - submitted),
        ttft_ms: a.first_token.map(|f| ms(f - submitted)),
        ttft_sent_ms: a.first_token.map(|f| ms(f - sent)),
        itl_ms: itl(&a.token_times),
        e2e_ms: ms(end - submitted),
        tokens_in: a.tokens_in,
        tokens_out: a.tokens_out,
        status: a.status,
        error: a.error,
        retries,
    });
}

/// Sends `prompt` to the least loaded healthy target. A failure before the first token (refused
/// connection, timeout, 5xx, a stream cut off before any token) marks a dead target down and moves the request to another target,
/// once; 429/503 and connection failures are retried after `Retry-After` (or ~200 ms, jittered),
/// all inside the run's retry budget. Returns the last attempt, the retries and its target.
async fn send(ctx: &Ctx, prompt: &str) -> (Attempt, u32, usize) {
    let cfg = &ctx.cfg;
    let cost = route::cost(prompt.len(), cfg.max_tokens);
    let mut t = route::pick(&ctx.targets, None).unwrap_or(0);
    let (mut retries, mut moved) = (0, false);
    loop {
        let a = {
            let _load = route::Load::add(&ctx.targets[t], cost);
            attempt(&Call {
                http: &ctx.http,
                target: &ctx.targets[t].url,
                model: &cfg.model,
                prompt,
                max_tokens: cfg.max_tokens,
                truncate_prompt_tokens: cfg.truncate_prompt_tokens,
                ignore_eos: cfg.ignore_eos,
                timeout: cfg.timeout,
                uploads: Some(&ctx.uploads),
            })
            .await
        };
        // A stream that broke before its first token delivered nothing to the user either: the
        // server died after answering 200 (seen when a backend is killed mid-prefill).
        let server_failed =
            a.first_token.is_none() && (a.status == 0 || a.status >= 500 || a.broken);
        if a.first_token.is_none() && (a.status == 0 || a.broken) {
            ctx.targets[t].set_healthy(false);
        }
        if retries >= cfg.retries {
            return (a, retries, t);
        }
        if server_failed
            && !moved
            && let Some(other) = route::pick(&ctx.targets, Some(t))
        {
            moved = true;
            retries += 1;
            t = other;
            continue;
        }
        if !(a.status == 429 || a.status == 503 || (server_failed && a.status == 0)) {
            return (a, retries, t);
        }
        retries += 1;
        tokio::time::sleep(jitter(a.retry_after.unwrap_or(Duration::from_millis(200)))).await;
        t = route::pick(&ctx.targets, None).unwrap_or(t);
    }
}
