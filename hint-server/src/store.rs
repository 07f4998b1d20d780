//! Everything the hint server keeps in Redis, so that replicas share it: client settings, each
//! client's current hint, each node's state, the pub/sub channel of new hints.

use std::{collections::HashMap, time::Duration};

use anyhow::{Context, Result};
use redis::{AsyncCommands, Client};
use tokenflow_schema::{
    ClientConfig, Hint, NodeSummary, keys,
    store::{Batch, Redis, Target, Timeouts},
};

use crate::engine::NodeState;

/// Dispatch reports kept per client (at the pacer's ten a second, four seconds of them), and how
/// long they outlive the newest.
pub const DISPATCH_KEEP: isize = 40;
pub const DISPATCH_TTL_MS: u64 = 10_000;

/// A replica not seen for this long is forgotten, and removed from the consumer group.
pub const REPLICA_FORGET_MS: u64 = 60_000;

/// Lua that sets `now` to the Redis node's clock in ms (the replica set is timed by it, not by the
/// replicas' hosts).
macro_rules! lua_now_ms {
    () => {
        "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n"
    };
}

/// What a heartbeat learnt: the replicas alive, and those just forgotten.
#[derive(Debug)]
pub struct Replicas {
    pub live: Vec<String>,
    pub gone: Vec<String>,
}

#[derive(Clone)]
pub struct Store {
    pub target: Target,
    /// For pub/sub: the server, or a cluster's seed nodes (a cluster forwards every classic
    /// PUBLISH to all its nodes, so any one serves a subscriber).
    subscribers: Vec<Client>,
    pub con: Redis,
}

impl Store {
    pub async fn connect(target: &Target) -> Result<Self> {
        let urls: Vec<&str> = match target {
            Target::Server(u) => vec![u],
            Target::Cluster(v) => v.iter().map(String::as_str).collect(),
        };
        let subscribers = urls
            .iter()
            .map(|u| Client::open(*u).with_context(|| format!("{u} is not a Redis URL")))
            .collect::<Result<_>>()?;
        let con = connect(target, Duration::from_secs(2)).await?;
        Ok(Self {
            target: target.clone(),
            subscribers,
            con,
        })
    }

    /// Where to subscribe on the `attempt`-th try: the seed nodes of a cluster in turn, so that a
    /// subscription survives the loss of one.
    pub fn subscriber(&self, attempt: usize) -> Client {
        self.subscribers[attempt % self.subscribers.len()].clone()
    }

    /// A second connection for blocking reads (XREADGROUP BLOCK), which would hold up every
    /// other command on a shared multiplexed connection. None for a cluster, where one blocking
    /// read cannot span the nodes' streams (they live in different slots): there the ingest polls.
    pub async fn blocking_connection(&self) -> Result<Option<Redis>> {
        if self.target.is_cluster() {
            return Ok(None);
        }
        Ok(Some(connect(&self.target, Duration::from_secs(10)).await?))
    }

    pub async fn clients(&self) -> Result<Vec<(String, ClientConfig)>> {
        let raw: HashMap<String, String> = self.con.clone().hgetall(keys::CLIENTS).await?;
        let mut v: Vec<(String, ClientConfig)> = raw
            .into_iter()
            .filter_map(|(id, json)| match serde_json::from_str(&json) {
                Ok(c) => Some((id, c)),
                Err(e) => {
                    tracing::warn!(client = %id, "ignoring unreadable client settings: {e}");
                    None
                }
            })
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(v)
    }

    pub async fn client(&self, id: &str) -> Result<Option<ClientConfig>> {
        let raw: Option<String> = self.con.clone().hget(keys::CLIENTS, id).await?;
        Ok(raw.and_then(|j| serde_json::from_str(&j).ok()))
    }

    pub async fn put_client(&self, id: &str, c: &ClientConfig) -> Result<()> {
        let _: () = self
            .con
            .clone()
            .hset(keys::CLIENTS, id, serde_json::to_string(c)?)
            .await?;
        Ok(())
    }

    /// Removes a client's settings, then its hint and dispatch reports (separate keys and slots in
    /// a cluster; what a failure in between leaves behind expires); false when it was not
    /// registered.
    pub async fn delete_client(&self, id: &str) -> Result<bool> {
        let mut con = self.con.clone();
        let removed: u32 = con.hdel(keys::CLIENTS, id).await?;
        let _: u32 = con.del(keys::hint(id)).await?;
        let _: u32 = con.del(keys::dispatched(id)).await?;
        Ok(removed > 0)
    }

    pub async fn hint(&self, id: &str) -> Result<Option<Hint>> {
        let raw: Option<String> = self.con.clone().get(keys::hint(id)).await?;
        Ok(raw.and_then(|j| serde_json::from_str(&j).ok()))
    }

    pub async fn node_state(&self, node: &str) -> Result<NodeState> {
        let raw: Option<String> = self.con.clone().get(keys::hint_state(node)).await?;
        Ok(raw
            .and_then(|j| serde_json::from_str(&j).ok())
            .unwrap_or_default())
    }

    /// Stores a node's state and its clients' hints and publishes the hints: one transaction on a
    /// server; in a cluster one transaction per slot (the state, the publications, each hint on
    /// its client's slot), side by side.
    pub async fn commit(&self, node: &str, st: &NodeState, hints: &[Hint]) -> Result<()> {
        let state_key = keys::hint_state(node);
        let mut b = Batch::new();
        let mut set = redis::cmd("SET");
        set.arg(&state_key).arg(serde_json::to_string(st)?);
        b.keyed(&state_key, set);
        for h in hints {
            let json = serde_json::to_string(h)?;
            let key = keys::hint(&h.client_id);
            let mut put = redis::cmd("PSETEX");
            put.arg(&key).arg(h.ttl_ms.max(1)).arg(&json);
            b.keyed(&key, put);
            let mut publish = redis::cmd("PUBLISH");
            publish.arg(keys::HINTS_CHANNEL).arg(&json);
            b.keyed(keys::HINTS_CHANNEL, publish);
        }
        b.exec(&mut self.con.clone(), true).await?;
        Ok(())
    }

    /// Appends a client's [`tokenflow_schema::DispatchReport`], stamped `at_ms` on arrival,
    /// keeping the last [`DISPATCH_KEEP`] for [`DISPATCH_TTL_MS`] after the newest.
    pub async fn record_dispatched(&self, id: &str, at_ms: u64, total: u64) -> Result<()> {
        let key = keys::dispatched(id);
        let mut b = Batch::new();
        let mut push = redis::cmd("RPUSH");
        push.arg(&key).arg(format!("{at_ms} {total}"));
        let mut trim = redis::cmd("LTRIM");
        trim.arg(&key).arg(-DISPATCH_KEEP).arg(-1);
        let mut expire = redis::cmd("PEXPIRE");
        expire.arg(&key).arg(DISPATCH_TTL_MS);
        b.keyed(&key, push).keyed(&key, trim).keyed(&key, expire);
        b.exec(&mut self.con.clone(), true).await?;
        Ok(())
    }

    /// The dispatch reports of `ids` (those with any), oldest first.
    pub async fn dispatched(&self, ids: &[&str]) -> Result<crate::engine::Dispatched> {
        let reads = ids.iter().map(|id| async move {
            let raw: Vec<String> = self.con.clone().lrange(keys::dispatched(id), 0, -1).await?;
            let samples: Vec<(u64, u64)> = raw
                .iter()
                .filter_map(|r| {
                    let (t, n) = r.split_once(' ')?;
                    Some((t.parse().ok()?, n.parse().ok()?))
                })
                .collect();
            anyhow::Ok((id.to_string(), samples))
        });
        Ok(futures_util::future::try_join_all(reads)
            .await?
            .into_iter()
            .filter(|(_, v)| !v.is_empty())
            .collect())
    }

    pub async fn nodes(&self) -> Result<Vec<String>> {
        let mut v: Vec<String> = self.con.clone().smembers(keys::NODES).await?;
        v.sort();
        Ok(v)
    }

    pub async fn latest(&self, node: &str) -> Result<Option<NodeSummary>> {
        let raw: Option<String> = self.con.clone().get(keys::latest(node)).await?;
        Ok(raw.and_then(|j| serde_json::from_str(&j).ok()))
    }

    /// Marks `consumer` as alive; returns every replica seen within `live_ms` (sorted), and those
    /// gone for [`REPLICA_FORGET_MS`], which it forgets (each such one is returned to exactly one
    /// caller). One script on the set's Redis node, timed by that node's clock, so that replicas
    /// on hosts whose clocks disagree still agree on who is alive.
    pub async fn heartbeat(&self, consumer: &str, live_ms: u64) -> Result<Replicas> {
        const SCRIPT: &str = concat!(
            lua_now_ms!(),
            r"
            redis.call('ZADD', KEYS[1], now, ARGV[1])
            local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
            redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
            local live = redis.call('ZRANGEBYSCORE', KEYS[1], now - tonumber(ARGV[2]), '+inf')
            return {live, gone}
        "
        );
        let (mut live, gone): (Vec<String>, Vec<String>) = redis::cmd("EVAL")
            .arg(SCRIPT)
            .arg(1)
            .arg(keys::HINT_REPLICAS)
            .arg(consumer)
            .arg(live_ms)
            .arg(REPLICA_FORGET_MS)
            .query_async(&mut self.con.clone())
            .await?;
        live.sort();
        Ok(Replicas { live, gone })
    }

    /// Removes a replica that is gone from the consumer group of each node's stream, with the
    /// windows it had read and not acknowledged (long stale by then). Returns how many those were,
    /// and the streams it could not do so on (a node whose stream is gone, say), which it skips.
    pub async fn forget_consumer(&self, consumer: &str, nodes: &[String]) -> (u64, Vec<String>) {
        let (mut dropped, mut failed) = (0, Vec::new());
        for n in nodes {
            let stream = keys::telemetry_stream(n);
            let r: redis::RedisResult<u64> = redis::cmd("XGROUP")
                .arg("DELCONSUMER")
                .arg(&stream)
                .arg(keys::HINT_GROUP)
                .arg(consumer)
                .query_async(&mut self.con.clone())
                .await;
            match r {
                Ok(pending) => dropped += pending,
                Err(e) => failed.push(format!("{stream}: {e}")),
            }
        }
        (dropped, failed)
    }

    /// Marks `consumer` as gone for a minute already (a clean shutdown): the others take its nodes
    /// at once, and the next heartbeat of one of them takes it out of the consumer group.
    pub async fn leave(&self, consumer: &str) -> Result<()> {
        const SCRIPT: &str = concat!(
            lua_now_ms!(),
            r"
            redis.call('ZADD', KEYS[1], now - tonumber(ARGV[2]) - 1, ARGV[1])
        "
        );
        let _: () = redis::cmd("EVAL")
            .arg(SCRIPT)
            .arg(1)
            .arg(keys::HINT_REPLICAS)
            .arg(consumer)
            .arg(REPLICA_FORGET_MS)
            .query_async(&mut self.con.clone())
            .await?;
        Ok(())
    }

    /// Takes a short lock (SET NX PX), so that one replica does a periodic job per node.
    pub async fn try_lock(&self, key: &str, ttl_ms: u64) -> Result<bool> {
        let r: Option<String> = redis::cmd("SET")
            .arg(key)
            .arg(std::process::id())
            .arg("NX")
            .arg("PX")
            .arg(ttl_ms)
            .query_async(&mut self.con.clone())
            .await?;
        Ok(r.is_some())
    }

    pub async fn ping(&self) -> Result<()> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.con.clone())
            .await?;
        Ok(())
    }
}

async fn connect(target: &Target, response: Duration) -> Result<Redis> {
    let t = Timeouts {
        connect: Duration::from_secs(2),
        response,
        retries: 2,
    };
    target.connect(t).await.with_context(|| {
        format!("connecting to {target} (is it running? see --redis and --redis-cluster)")
    })
}
