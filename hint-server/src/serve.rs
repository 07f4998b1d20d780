//! `tokenflow-hint-server serve`: ingest through a Redis consumer group, decide, publish, refit.

use std::{
    net::SocketAddr,
    ops::ControlFlow,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use arc_swap::ArcSwapOption;
use futures_util::{StreamExt, TryStreamExt};
use redis::{
    AsyncCommands,
    streams::{StreamKey, StreamRangeReply, StreamReadOptions, StreamReadReply},
};
use tokenflow_schema::{ClientConfig, Hint, TelemetryWindow, keys, store::Target};
use tokio::sync::broadcast;

use crate::{
    engine::{self, is_stale, on_stale, on_window},
    features::FeatureBuilder,
    model::{Models, calm_mask},
    store::Store,
};

#[derive(Clone, Debug)]
pub struct Settings {
    pub redis: Target,
    pub listen: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub token: Option<String>,
    pub auth_reads: bool,
    pub interval: Duration,
    pub model: Option<PathBuf>,
    pub refit_every: Duration,
    pub train_windows: usize,
    pub consumer: String,
    /// Demo reports for the dashboard's A/B view.
    pub results: Option<PathBuf>,
}

pub struct App {
    pub settings: Settings,
    pub store: Store,
    pub models: ArcSwapOption<Models>,
    pub hints: broadcast::Sender<Hint>,
    pub ingest_alive: AtomicBool,
    /// The newest hint per client, as published on `tokenflow:hints` by any replica: reads are
    /// served from here while the hint is within its TTL, and from Redis otherwise.
    pub cache: std::sync::RwLock<std::collections::HashMap<String, Hint>>,
    /// Every registered client, read from Redis at most every [`CLIENTS_TTL`]: one decision per
    /// window must not read the whole client table (1,000 nodes → 1,000 reads of it per second).
    /// Writes through this replica's API clear it; another replica's writes show within the TTL.
    clients: std::sync::Mutex<Option<(Instant, ClientTable)>>,
}

/// Every registered client with its settings.
pub type ClientTable = Arc<Vec<(String, ClientConfig)>>;

/// Nodes whose windows one replica decides on at the same time.
const INGEST_PARALLEL: usize = 64;
/// In a Redis Cluster: reads of node streams in flight at once, and how often every node's
/// stream is read whether or not it announced a window.
const CLUSTER_READS_PARALLEL: usize = 64;
const CLUSTER_SWEEP: Duration = Duration::from_secs(1);
/// How often a replica says it is alive, and how long without that it still counts as alive: in a
/// Redis Cluster, as one of those that split the announced nodes (a replica gone longer loses its
/// nodes to the others); everywhere, for the gauge (see also `store::REPLICA_FORGET_MS`).
const REPLICA_HEARTBEAT: Duration = Duration::from_secs(1);
const REPLICA_LIVE: Duration = Duration::from_secs(3);

/// How long a replica decides with its copy of the client table.
pub const CLIENTS_TTL: Duration = Duration::from_millis(500);

impl App {
    pub fn new(settings: Settings, store: Store, models: Option<Arc<Models>>) -> Arc<Self> {
        let (tx, _) = broadcast::channel(1024);
        Arc::new(App {
            settings,
            store,
            models: ArcSwapOption::new(models),
            hints: tx,
            ingest_alive: AtomicBool::new(false),
            cache: Default::default(),
            clients: Default::default(),
        })
    }

    /// The registered clients, from the copy if it is younger than [`CLIENTS_TTL`].
    pub async fn clients(&self) -> Result<ClientTable> {
        if let Ok(c) = self.clients.lock()
            && let Some((at, v)) = c.as_ref()
            && at.elapsed() < CLIENTS_TTL
        {
            return Ok(v.clone());
        }
        let v = Arc::new(self.store.clients().await?);
        if let Ok(mut c) = self.clients.lock() {
            *c = Some((Instant::now(), v.clone()));
        }
        Ok(v)
    }

    /// Forgets the copy of the client table (after a write through this replica).
    pub fn clients_changed(&self) {
        if let Ok(mut c) = self.clients.lock() {
            *c = None;
        }
    }

    /// Remembers a published hint (newest wins) and passes it to the SSE streams.
    pub fn remember(&self, h: Hint) {
        if let Ok(mut c) = self.cache.write() {
            let newer = c
                .get(&h.client_id)
                .is_none_or(|old| old.issued_at_unix_ms <= h.issued_at_unix_ms);
            if newer {
                c.insert(h.client_id.clone(), h.clone());
            }
        }
        let _ = self.hints.send(h);
    }

    /// The cached hint of a client, if still within its TTL.
    pub fn cached(&self, client: &str, now_ms: u64) -> Option<Hint> {
        let c = self.cache.read().ok()?;
        c.get(client)
            .filter(|h| h.issued_at_unix_ms + h.ttl_ms > now_ms)
            .cloned()
    }
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub async fn serve(settings: Settings) -> Result<()> {
    if let Some(addr) = settings.metrics {
        crate::api::install_metrics(addr)?;
    }
    let store = Store::connect(&settings.redis).await?;
    store
        .ping()
        .await
        .with_context(|| format!("Redis at {} does not answer", settings.redis))?;
    let models = match &settings.model {
        Some(p) if p.exists() => {
            let m = Models::load(p)?;
            tracing::info!(path = %p.display(), rows = m.rows, "models loaded");
            Some(Arc::new(m))
        }
        Some(p) => {
            tracing::info!(path = %p.display(), "no model file yet: serving without models until the first refit");
            None
        }
        None => None,
    };
    let app = App::new(settings.clone(), store, models);
    tokio::spawn(ingest_loop(app.clone()));
    tokio::spawn(stale_loop(app.clone()));
    tokio::spawn(pubsub_loop(app.clone()));
    tokio::spawn(refit_loop(app.clone()));
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| {
            format!(
                "listening on {} (is the port in use? use --listen)",
                settings.listen
            )
        })?;
    tracing::info!(addr = %settings.listen, consumer = %settings.consumer, "serving hints");
    axum::serve(listener, crate::api::router(app.clone()))
        .with_graceful_shutdown(shutdown())
        .await
        .context("HTTP server")?;
    if let Err(e) = app.store.leave(&app.settings.consumer).await {
        tracing::warn!("leaving the replica list: {e:#}");
    }
    tracing::info!("stopped");
    Ok(())
}

async fn shutdown() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
}

/// How the ingest learns which streams hold new windows.
enum Source {
    /// One server: a single blocking read spans every node's stream.
    Blocking(tokenflow_schema::store::Redis),
    /// A cluster: each node's stream is its own slot, so no one read spans them. The streams of
    /// the nodes that announced a window (`tokenflow:windows`) are read, and every stream once per
    /// sweep, for announcements missed while unsubscribed.
    Announced(tokio::sync::mpsc::Receiver<String>),
}

/// Reads every node's stream through the consumer group, one window at a time per node.
async fn ingest_loop(app: Arc<App>) {
    let mut backoff = Duration::from_millis(200);
    loop {
        match ingest(&app).await {
            Ok(()) => return,
            Err(e) => {
                app.ingest_alive.store(false, Ordering::Relaxed);
                metrics::counter!("tokenflow_hint_redis_errors_total").increment(1);
                tracing::warn!("ingest: {e:#}; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

async fn ingest(app: &App) -> Result<()> {
    let mut source = match app.store.blocking_connection().await? {
        Some(reader) => Source::Blocking(reader),
        None => Source::Announced(announcements(app.store.clone())),
    };
    let mut con = app.store.con.clone();
    let mut nodes: Vec<String> = Vec::new();
    let mut refreshed = Instant::now() - Duration::from_secs(60);
    let mut last_sweep = Instant::now() - CLUSTER_SWEEP;
    let mut replicas: Vec<String> = Vec::new();
    let mut heartbeat = Instant::now() - REPLICA_HEARTBEAT;
    let mut heartbeat_failing = false;
    let group = |block: Option<usize>| {
        let o = StreamReadOptions::default()
            .group(keys::HINT_GROUP, &app.settings.consumer)
            .count(32);
        match block {
            Some(ms) => o.block(ms),
            None => o,
        }
    };
    loop {
        if refreshed.elapsed() > Duration::from_secs(2) {
            let now = app.store.nodes().await?;
            for n in &now {
                if !nodes.contains(n) {
                    let r: redis::RedisResult<()> = con
                        .xgroup_create_mkstream(keys::telemetry_stream(n), keys::HINT_GROUP, "$")
                        .await;
                    if let Err(e) = r
                        && e.code() != Some("BUSYGROUP")
                    {
                        return Err(e).context("creating the consumer group");
                    }
                    tracing::info!(node = %n, "reading telemetry");
                }
            }
            nodes = now;
            refreshed = Instant::now();
        }
        if heartbeat.elapsed() >= REPLICA_HEARTBEAT {
            heartbeat = Instant::now();
            // A heartbeat that fails (a Redis that refuses scripts, say) does not stop the ingest:
            // the replica keeps the replicas it last saw (none: it reads every node, racing the
            // others as the consumer group allows) and says so once.
            match app
                .store
                .heartbeat(&app.settings.consumer, REPLICA_LIVE.as_millis() as u64)
                .await
            {
                Ok(seen) => {
                    heartbeat_failing = false;
                    metrics::gauge!("tokenflow_hint_replicas").set(seen.live.len() as f64);
                    replicas = seen.live;
                    for gone in seen.gone {
                        tokio::spawn(forget(app.store.clone(), gone, nodes.clone()));
                    }
                }
                Err(e) => {
                    metrics::counter!("tokenflow_hint_redis_errors_total").increment(1);
                    if !std::mem::replace(&mut heartbeat_failing, true) {
                        tracing::warn!(
                            "replica heartbeat: {e:#}; the replicas cannot split the nodes until it works"
                        );
                    }
                }
            }
        }
        app.ingest_alive.store(true, Ordering::Relaxed);
        if nodes.is_empty() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        }
        let keys: Vec<StreamKey> = match &mut source {
            Source::Blocking(reader) => {
                let streams: Vec<String> =
                    nodes.iter().map(|n| keys::telemetry_stream(n)).collect();
                let ids: Vec<&str> = vec![">"; streams.len()];
                let reply: Option<StreamReadReply> = reader
                    .xread_options(&streams, &ids, &group(Some(1000)))
                    .await?;
                reply.map(|r| r.keys).unwrap_or_default()
            }
            Source::Announced(announced) => {
                // Only the nodes this replica owns among the live ones: the others read theirs.
                let me = app.settings.consumer.as_str();
                let mine = |n: &String| owner(&replicas, n).is_none_or(|o| o == me);
                let due: Vec<String> = if last_sweep.elapsed() >= CLUSTER_SWEEP {
                    last_sweep = Instant::now();
                    nodes
                        .iter()
                        .filter(|n| mine(n))
                        .map(|n| keys::telemetry_stream(n))
                        .collect()
                } else {
                    let wait = CLUSTER_SWEEP.saturating_sub(last_sweep.elapsed());
                    match tokio::time::timeout(wait, announced.recv()).await {
                        Err(_) => continue,
                        Ok(None) => anyhow::bail!("the window announcements stopped"),
                        Ok(Some(first)) => {
                            let mut due = std::collections::BTreeSet::from([first]);
                            while let Ok(n) = announced.try_recv() {
                                due.insert(n);
                            }
                            due.into_iter()
                                .filter(|n| nodes.contains(n) && mine(n))
                                .map(|n| keys::telemetry_stream(&n))
                                .collect()
                        }
                    }
                };
                let reads: Vec<_> = due
                    .into_iter()
                    .map(|s| read_one(con.clone(), s, group(None)))
                    .collect();
                futures_util::stream::iter(reads)
                    .buffer_unordered(CLUSTER_READS_PARALLEL)
                    .try_collect::<Vec<_>>()
                    .await?
                    .into_iter()
                    .flatten()
                    .collect()
            }
        };
        if keys.is_empty() {
            continue;
        }
        // Nodes side by side (up to INGEST_PARALLEL at once), each node's windows in order.
        let jobs = keys.into_iter().map(|key| {
            let mut con = con.clone();
            async move {
                for entry in key.ids {
                    let window: Option<TelemetryWindow> = entry
                        .get::<String>(keys::WINDOW_FIELD)
                        .and_then(|j| serde_json::from_str(&j).ok());
                    match window {
                        Some(w) => process(app, &w).await?,
                        None => {
                            tracing::warn!(stream = %key.key, id = %entry.id, "skipping an entry that is not a window")
                        }
                    }
                    let _: () = con.xack(&key.key, keys::HINT_GROUP, &[&entry.id]).await?;
                }
                anyhow::Ok(())
            }
        });
        let mut done = futures_util::stream::iter(jobs).buffer_unordered(INGEST_PARALLEL);
        while let Some(r) = done.next().await {
            r?;
        }
    }
}

/// Takes a replica gone for a minute out of every node's consumer group (its consumer and the
/// windows it had read but not acknowledged when it stopped), so that crashed replicas do not pile
/// up in the group; a replica that restarts joins under a new name.
async fn forget(store: Store, replica: String, nodes: Vec<String>) {
    let (dropped, failed) = store.forget_consumer(&replica, &nodes).await;
    tracing::info!(
        %replica,
        dropped,
        "a replica gone for a minute left the consumer group (dropped: windows it had read and not acknowledged)"
    );
    if let Some(first) = failed.first() {
        tracing::warn!(%replica, "not removed from {} of {} streams' groups, e.g. {first}", failed.len(), nodes.len());
    }
}

/// The replica that reads a node's announced windows: the one with the highest hash of (replica,
/// node) — rendezvous hashing, so each node has one owner, the nodes split evenly, and a replica
/// that joins or leaves moves only the nodes it takes or had. `None` while no replica is known.
/// Every replica runs the same binary, so they agree on the hash.
pub fn owner<'a>(replicas: &'a [String], node: &str) -> Option<&'a str> {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let hasher = BuildHasherDefault::<DefaultHasher>::default();
    replicas
        .iter()
        .max_by_key(|r| hasher.hash_one((r.as_str(), node)))
        .map(String::as_str)
}

/// The node ids announced on `tokenflow:windows` (a cluster forwards every classic PUBLISH to all
/// its nodes, so one subscription on any node hears every agent). Announcements beyond what the
/// ingest has yet to read are dropped: the sweep reads those streams anyway.
fn announcements(store: Store) -> tokio::sync::mpsc::Receiver<String> {
    let (tx, rx) = tokio::sync::mpsc::channel(4096);
    tokio::spawn(async move {
        let on_node = |node| match tx.try_send(node) {
            Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => ControlFlow::Break(()),
            _ => ControlFlow::Continue(()),
        };
        // The ingest that listened has ended (it starts a new listener when it restarts).
        let gone = || tx.is_closed();
        subscribe(
            &store,
            keys::WINDOWS_CHANNEL,
            "window announcements",
            on_node,
            gone,
        )
        .await;
    });
    rx
}

/// Hands each message published on `channel` to `on_payload` until it breaks, subscribing again
/// (on the next seed node, in a cluster) a second after the subscription fails or ends, unless
/// `gone` says nobody listens any more.
async fn subscribe(
    store: &Store,
    channel: &str,
    what: &str,
    mut on_payload: impl FnMut(String) -> ControlFlow<()>,
    gone: impl Fn() -> bool,
) {
    for attempt in 0.. {
        if gone() {
            return;
        }
        let client = store.subscriber(attempt);
        let r: Result<ControlFlow<()>> = async {
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(channel).await?;
            let mut s = ps.on_message();
            while let Some(msg) = s.next().await {
                if let Ok(payload) = msg.get_payload::<String>()
                    && on_payload(payload).is_break()
                {
                    return Ok(ControlFlow::Break(()));
                }
            }
            Ok(ControlFlow::Continue(()))
        }
        .await;
        match r {
            Ok(ControlFlow::Break(())) => return,
            Ok(ControlFlow::Continue(())) => {}
            Err(e) => tracing::warn!("{what}: {e:#}; resubscribing"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// New entries of one stream for this consumer, without blocking.
async fn read_one(
    mut con: tokenflow_schema::store::Redis,
    stream: String,
    opts: StreamReadOptions,
) -> Result<Vec<StreamKey>> {
    let r: Option<StreamReadReply> = con.xread_options(&[&stream], &[">"], &opts).await?;
    Ok(r.map(|r| r.keys).unwrap_or_default())
}

/// One window: the node's state from Redis, the decision, state and hints back to Redis.
pub async fn process(app: &App, w: &TelemetryWindow) -> Result<()> {
    let clients = app.clients().await?;
    let mut st = app.store.node_state(&w.node_id).await?;
    let mine: Vec<&str> = clients
        .iter()
        .filter(|(_, c)| c.node_id == w.node_id)
        .map(|(id, _)| id.as_str())
        .collect();
    let dispatched = app.store.dispatched(&mine).await?;
    let models = app.models.load_full();
    let t0 = Instant::now();
    let out = on_window(
        &mut st,
        w,
        &clients,
        models.as_deref(),
        &dispatched,
        unix_ms(),
        app.settings.interval.as_millis() as u64,
    );
    metrics::histogram!("tokenflow_hint_decision_seconds").record(t0.elapsed().as_secs_f64());
    metrics::counter!("tokenflow_hint_windows_total").increment(1);
    metrics::gauge!("tokenflow_hint_anomaly_score", "node" => w.node_id.clone())
        .set(st.last_anomaly);
    if let Some(p) = st.last_predicted_ms {
        metrics::gauge!("tokenflow_hint_predicted_rtt_seconds", "node" => w.node_id.clone())
            .set(p / 1000.0);
    }
    record_hints(&out.hints);
    app.store.commit(&w.node_id, &st, &out.hints).await
}

fn record_hints(hints: &[Hint]) {
    for h in hints {
        metrics::counter!("tokenflow_hint_hints_total", "controller" => h.controller.as_str(), "stale" => if h.stale { "true" } else { "false" }).increment(1);
        metrics::gauge!("tokenflow_hint_rate_limit_requests_per_second", "client" => h.client_id.clone()).set(h.rate_limit_rps);
    }
}

/// Every interval: nodes whose windows stopped get conservative, stale hints (one replica per
/// node and interval, by a short lock).
async fn stale_loop(app: Arc<App>) {
    let interval = app.settings.interval;
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        if let Err(e) = stale_pass(&app).await {
            tracing::warn!("stale check: {e:#}");
        }
    }
}

async fn stale_pass(app: &App) -> Result<()> {
    let clients = app.clients().await?;
    let interval_ms = app.settings.interval.as_millis() as u64;
    let mut nodes: Vec<&str> = clients.iter().map(|(_, c)| c.node_id.as_str()).collect();
    nodes.sort();
    nodes.dedup();
    for node in nodes {
        let mut st = app.store.node_state(node).await?;
        let now = unix_ms();
        if !is_stale(&st, now, interval_ms) {
            continue;
        }
        if !app
            .store
            .try_lock(&keys::stale_lock(node), interval_ms.max(100))
            .await?
        {
            continue;
        }
        let hints = on_stale(&mut st, node, &clients, now, interval_ms);
        metrics::counter!("tokenflow_hint_stale_decisions_total").increment(1);
        record_hints(&hints);
        app.store.commit(node, &st, &hints).await?;
    }
    Ok(())
}

/// New hints from every replica, for the SSE streams of this one.
async fn pubsub_loop(app: Arc<App>) {
    let on_hint = |payload: String| {
        if let Ok(h) = serde_json::from_str::<Hint>(&payload) {
            app.remember(h);
        }
        ControlFlow::Continue(())
    };
    subscribe(
        &app.store,
        keys::HINTS_CHANNEL,
        "hint subscription",
        on_hint,
        || false,
    )
    .await;
}

/// Refits the models on the newest windows of every node, in the background, and swaps them in
/// atomically; serving keeps using the old ones meanwhile.
async fn refit_loop(app: Arc<App>) {
    let mut tick = tokio::time::interval(app.settings.refit_every);
    tick.tick().await;
    loop {
        tick.tick().await;
        match refit(&app).await {
            Ok(Some(rows)) => tracing::info!(rows, "models refitted"),
            Ok(None) => {}
            Err(e) => tracing::warn!("refit: {e:#}"),
        }
    }
}

pub async fn refit(app: &App) -> Result<Option<usize>> {
    let mut con = app.store.con.clone();
    let (mut features, mut calm) = (Vec::new(), Vec::new());
    for node in app.store.nodes().await? {
        let reply: StreamRangeReply = con
            .xrevrange_count(
                keys::telemetry_stream(&node),
                "+",
                "-",
                app.settings.train_windows,
            )
            .await?;
        let mut windows: Vec<TelemetryWindow> = reply
            .ids
            .iter()
            .filter_map(|e| e.get::<String>(keys::WINDOW_FIELD))
            .filter_map(|j| serde_json::from_str(&j).ok())
            .collect();
        windows.sort_by_key(|w| w.end_unix_ms);
        let mut b = FeatureBuilder::default();
        let f: Vec<_> = windows.iter().map(|w| b.push(w)).collect();
        calm.extend(calm_mask(&f));
        features.extend(f);
    }
    if features.len() < 300 {
        tracing::debug!(
            windows = features.len(),
            "too few windows to refit (need 300)"
        );
        return Ok(None);
    }
    let rows = features.len();
    let now = unix_ms();
    let t0 = Instant::now();
    let models =
        tokio::task::spawn_blocking(move || Models::train(&features, &calm, now, now)).await??;
    metrics::histogram!("tokenflow_hint_training_seconds").record(t0.elapsed().as_secs_f64());
    metrics::counter!("tokenflow_hint_model_refits_total").increment(1);
    if let Some(p) = &app.settings.model {
        models.save(p)?;
    }
    app.models.store(Some(Arc::new(models)));
    Ok(Some(rows))
}

pub use engine::conservative;

#[cfg(test)]
mod tests {
    use super::owner;

    fn names(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn replicas_split_the_nodes_evenly_and_a_leaving_one_moves_only_its_own() {
        let nodes: Vec<String> = (0..1000).map(|i| format!("node-{i:05}")).collect();
        let two = names(&["replica-a", "replica-b"]);
        let three = names(&["replica-a", "replica-b", "replica-c"]);
        assert_eq!(owner(&[], "node-00001"), None);
        let of = |set: &[String]| -> Vec<String> {
            nodes
                .iter()
                .map(|n| owner(set, n).unwrap().to_string())
                .collect()
        };
        let (by_two, by_three) = (of(&two), of(&three));
        let share = |owners: &[String], r: &str| owners.iter().filter(|o| *o == r).count();
        for r in &two {
            let n = share(&by_two, r);
            assert!((400..=600).contains(&n), "{r} owns {n} of 1000 nodes");
        }
        for r in &three {
            let n = share(&by_three, r);
            assert!(
                (250..=420).contains(&n),
                "{r} owns {n} of 1000 nodes (of 3)"
            );
        }
        // replica-c leaving: only its nodes change owner.
        for (i, n) in nodes.iter().enumerate() {
            if by_three[i] != "replica-c" {
                assert_eq!(
                    by_three[i], by_two[i],
                    "{n} moved although its owner stayed"
                );
            }
        }
        // The order the replicas are listed in does not matter.
        let reversed = names(&["replica-b", "replica-a"]);
        assert_eq!(of(&reversed), by_two);
    }
}
