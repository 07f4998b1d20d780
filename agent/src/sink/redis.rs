//! Redis sink: every window is `XADD`ed to the node's stream (trimmed by age with `MINID ~`), the small
//! summary goes to the node's "latest" key. A Redis outage never blocks the capture: windows wait in a
//! bounded buffer (oldest dropped first, each drop counted) while a background task reconnects with
//! exponential backoff.

use std::{
    collections::VecDeque,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use tokenflow_schema::{
    NodeSummary, SinkStats, TelemetryWindow, keys,
    store::{Batch, Redis, Target, Timeouts},
};
use tokio::{
    sync::mpsc,
    task::JoinHandle,
    time::{Instant, sleep_until},
};

#[derive(Clone, Debug)]
pub struct RedisConfig {
    pub target: Target,
    pub node_id: String,
    /// Stream entries older than this are trimmed.
    pub retention: Duration,
    /// Windows held while Redis is unreachable.
    pub buffer: usize,
    /// The "latest" key expires after this long without a write.
    pub latest_ttl: Duration,
}

/// Counters shared with the agent's main loop, reported in every window.
#[derive(Debug, Default)]
pub struct RedisStats {
    buffered: AtomicU64,
    dropped: AtomicU64,
    written: AtomicU64,
    connected: AtomicBool,
}

impl RedisStats {
    pub fn snapshot(&self) -> SinkStats {
        SinkStats {
            redis_buffered: self.buffered.load(Ordering::Relaxed),
            redis_dropped_total: self.dropped.load(Ordering::Relaxed),
            redis_written_total: self.written.load(Ordering::Relaxed),
            redis_connected: self.connected.load(Ordering::Relaxed),
        }
    }
}

pub struct RedisSink {
    tx: mpsc::Sender<TelemetryWindow>,
    pub stats: Arc<RedisStats>,
    task: JoinHandle<()>,
}

impl RedisSink {
    /// Starts the writer task; connecting happens in the background.
    pub fn start(cfg: RedisConfig) -> Self {
        let stats = Arc::new(RedisStats::default());
        let (tx, rx) = mpsc::channel(16);
        let task = tokio::spawn(writer(cfg, rx, stats.clone()));
        Self { tx, stats, task }
    }

    /// Hands a window to the writer without waiting; a writer that has fallen this far behind drops it.
    pub fn send(&self, w: TelemetryWindow) {
        if self.tx.try_send(w).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Closes the channel and gives the writer `grace` to flush what it holds.
    pub async fn close(self, grace: Duration) {
        drop(self.tx);
        let _ = tokio::time::timeout(grace, self.task).await;
    }
}

async fn connect(target: &Target) -> redis::RedisResult<Redis> {
    target
        .connect(Timeouts {
            connect: Duration::from_secs(1),
            response: Duration::from_secs(1),
            retries: 1,
        })
        .await
}

async fn writer(cfg: RedisConfig, mut rx: mpsc::Receiver<TelemetryWindow>, stats: Arc<RedisStats>) {
    let mut w = Writer {
        cfg,
        conn: None,
        buf: VecDeque::new(),
        stats,
        in_doubt: None,
        parked: None,
    };
    let mut backoff = Backoff::default();
    let mut retry_at = Instant::now();
    loop {
        let waiting = !w.buf.is_empty() && Instant::now() < retry_at;
        tokio::select! {
            next = rx.recv() => match next {
                Some(window) => w.push(window),
                None => {
                    // Shutting down: one last attempt for whatever is buffered.
                    w.flush().await;
                    if !w.buf.is_empty() {
                        tracing::warn!("{} windows not delivered to Redis at shutdown", w.buf.len());
                    }
                    return;
                }
            },
            _ = sleep_until(retry_at), if waiting => {}
        }
        if !w.buf.is_empty() && Instant::now() >= retry_at {
            if w.flush().await {
                backoff = Backoff::default();
            } else {
                let wait = backoff.next();
                tracing::warn!(
                    "Redis unreachable; {} windows buffered, retrying in {wait:?}",
                    w.buf.len()
                );
                retry_at = Instant::now() + wait;
            }
        }
    }
}

struct Writer {
    cfg: RedisConfig,
    conn: Option<Redis>,
    buf: VecDeque<TelemetryWindow>,
    stats: Arc<RedisStats>,
    /// End time of the window whose write failed: Redis may have stored it before the connection
    /// broke, so whether it is lost is only known once Redis answers again.
    in_doubt: Option<u64>,
    /// That window, evicted from a full buffer before it could be checked: counted as written or
    /// dropped once Redis answers, never both and never twice.
    parked: Option<u64>,
}

impl Writer {
    /// Buffers a window, dropping the oldest when the buffer is full.
    fn push(&mut self, window: TelemetryWindow) {
        if self.buf.len() >= self.cfg.buffer.max(1)
            && let Some(old) = self.buf.pop_front()
        {
            if self.in_doubt == Some(old.end_unix_ms) {
                self.in_doubt = None;
                self.parked = Some(old.end_unix_ms);
            } else {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.buf.push_back(window);
        self.stats
            .buffered
            .store(self.buf.len() as u64, Ordering::Relaxed);
    }

    /// Writes buffered windows oldest first; true when the buffer is empty afterwards.
    async fn flush(&mut self) -> bool {
        if self.conn.is_none() {
            match connect(&self.cfg.target).await {
                Ok(c) => {
                    tracing::info!(redis = %self.cfg.target, "connected to Redis");
                    self.conn = Some(c);
                }
                Err(e) => {
                    tracing::debug!("connecting to Redis: {e}");
                    self.stats.connected.store(false, Ordering::Relaxed);
                    return false;
                }
            }
        }
        let Some(conn) = self.conn.as_mut() else {
            return false;
        };
        if self.in_doubt.is_some() || self.parked.is_some() {
            // Settle the window whose write failed: the stream's newest entry says whether it landed.
            let last: redis::RedisResult<redis::streams::StreamRangeReply> =
                redis::cmd("XREVRANGE")
                    .arg(keys::telemetry_stream(&self.cfg.node_id))
                    .arg("+")
                    .arg("-")
                    .arg("COUNT")
                    .arg(1)
                    .query_async(conn)
                    .await;
            let Ok(last) = last else {
                self.stats.connected.store(false, Ordering::Relaxed);
                return false;
            };
            let stored_ms = last
                .ids
                .first()
                .and_then(|e| e.id.split('-').next()?.parse::<u64>().ok())
                .unwrap_or(0);
            if let Some(p) = self.parked.take() {
                let counter = if p <= stored_ms {
                    &self.stats.written
                } else {
                    &self.stats.dropped
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
            while self.buf.front().is_some_and(|w| w.end_unix_ms <= stored_ms) {
                self.buf.pop_front();
                self.stats.written.fetch_add(1, Ordering::Relaxed);
            }
            self.in_doubt = None;
        }
        while let Some(window) = self.buf.front() {
            let t0 = std::time::Instant::now();
            if let Err(e) = write(conn, &self.cfg, window).await {
                tracing::debug!("Redis write: {e}");
                self.in_doubt = Some(window.end_unix_ms);
                self.stats.connected.store(false, Ordering::Relaxed);
                return false;
            }
            metrics::histogram!(crate::sink::prometheus::REDIS_WRITE_SECONDS)
                .record(t0.elapsed().as_secs_f64());
            self.stats.written.fetch_add(1, Ordering::Relaxed);
            self.stats.connected.store(true, Ordering::Relaxed);
            self.buf.pop_front();
            self.stats
                .buffered
                .store(self.buf.len() as u64, Ordering::Relaxed);
        }
        true
    }
}

/// XADD with the window's end time as the entry ID (so ranges by time work), trimming by age; then
/// the latest summary and the node set.
async fn write(c: &mut Redis, cfg: &RedisConfig, w: &TelemetryWindow) -> redis::RedisResult<()> {
    let stream = keys::telemetry_stream(&w.node_id);
    let json =
        serde_json::to_string(w).map_err(|e| redis::RedisError::from(std::io::Error::other(e)))?;
    let min_id = w
        .end_unix_ms
        .saturating_sub(cfg.retention.as_millis() as u64);
    let summary = NodeSummary {
        schema_version: w.schema_version,
        node_id: w.node_id.clone(),
        seq: w.seq,
        end_unix_ms: w.end_unix_ms,
        node: w.node.clone(),
    };
    let summary = serde_json::to_string(&summary)
        .map_err(|e| redis::RedisError::from(std::io::Error::other(e)))?;
    // One round trip on a server: the entry, the latest summary, the announcement and the node set
    // in a pipeline (in a cluster, the node's keys share a slot; the node set and the announcement
    // go as pipelines of their own).
    let ttl = cfg.latest_ttl.as_millis().max(1) as u64;
    let batch = |id: String| {
        let mut xadd = redis::cmd("XADD");
        xadd.arg(&stream)
            .arg("MINID")
            .arg("~")
            .arg(min_id)
            .arg(id)
            .arg(keys::WINDOW_FIELD)
            .arg(&json);
        let latest = keys::latest(&cfg.node_id);
        let mut put = redis::cmd("PSETEX");
        put.arg(&latest).arg(ttl).arg(&summary);
        let mut sadd = redis::cmd("SADD");
        sadd.arg(keys::NODES).arg(&cfg.node_id);
        let mut announce = redis::cmd("PUBLISH");
        announce.arg(keys::WINDOWS_CHANNEL).arg(&cfg.node_id);
        let mut b = Batch::new();
        b.keyed(&stream, xadd)
            .keyed(&latest, put)
            .keyed(keys::WINDOWS_CHANNEL, announce)
            .keyed(keys::NODES, sadd);
        b
    };
    let written = batch(format!("{}-*", w.end_unix_ms)).exec(c, false).await;
    if let Err(e) = written {
        // The clock went back (or another writer used this key): let Redis pick the ID.
        if e.kind() != redis::ErrorKind::Server(redis::ServerErrorKind::ResponseError) {
            return Err(e);
        }
        batch("*".to_string()).exec(c, false).await?;
    }
    Ok(())
}

/// 100 ms, doubling to 5 s.
#[derive(Debug)]
struct Backoff(Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(Duration::from_millis(100))
    }
}

impl Backoff {
    fn next(&mut self) -> Duration {
        let now = self.0;
        self.0 = (self.0 * 2).min(Duration::from_secs(5));
        now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_a_cap() {
        let mut b = Backoff::default();
        let seq: Vec<u64> = (0..8).map(|_| b.next().as_millis() as u64).collect();
        assert_eq!(seq, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }
}
