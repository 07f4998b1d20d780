//! How every TokenFlow process reaches Redis: one server, or a Redis Cluster (feature `redis`).
//!
//! [`Redis`] is a connection to either, usable with every `redis` command helper. Writes that touch
//! several keys go through a [`Batch`]: on one server a single pipeline (a MULTI/EXEC transaction
//! when asked), in a cluster one pipeline per hash slot — a cluster refuses a pipeline or a
//! transaction across slots — each atomic on its own, sent side by side. The node-scoped keys in
//! [`crate::keys`] carry the node id as a hash tag, so everything one node writes lands on one slot.

use std::{fmt, time::Duration};

use futures_util::future::try_join_all;
use redis::{
    Cmd, Pipeline, RedisFuture, RedisResult, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    cluster_routing::Slot,
};

/// Where Redis is: one server, or the seed nodes of a cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Server(String),
    /// Seed nodes; the client learns the rest of the cluster (and its slot map) from them.
    Cluster(Vec<String>),
}

impl Target {
    /// One URL, or with `cluster` one or more comma-separated seed URLs of a Redis Cluster.
    pub fn parse(urls: &str, cluster: bool) -> Result<Self, String> {
        let mut list: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect();
        if list.is_empty() {
            return Err("no Redis URL given (expected e.g. redis://127.0.0.1:6379)".into());
        }
        for u in &list {
            redis::Client::open(u.as_str()).map_err(|e| {
                format!("{u:?} is not a Redis URL ({e}); expected e.g. redis://127.0.0.1:6379")
            })?;
        }
        match (cluster, list.len()) {
            (true, _) => Ok(Self::Cluster(list)),
            (false, 1) => Ok(Self::Server(list.swap_remove(0))),
            (false, n) => Err(format!(
                "{n} Redis URLs given; several URLs are the seed nodes of a Redis Cluster (add --redis-cluster)"
            )),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Self::Cluster(_))
    }

    /// Connects; both kinds reconnect by themselves afterwards.
    pub async fn connect(&self, t: Timeouts) -> RedisResult<Redis> {
        match self {
            Self::Server(url) => {
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(t.connect))
                    .set_response_timeout(Some(t.response))
                    .set_number_of_retries(t.retries);
                let client = redis::Client::open(url.as_str())?;
                Ok(Redis::Server(
                    ConnectionManager::new_with_config(client, cfg).await?,
                ))
            }
            Self::Cluster(seeds) => {
                let client = ClusterClientBuilder::new(seeds.iter().map(String::as_str))
                    .connection_timeout(t.connect)
                    .response_timeout(t.response)
                    .retries(t.retries as u32)
                    .build()?;
                Ok(Redis::Cluster(client.get_async_connection().await?))
            }
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Server(u) => f.write_str(u),
            Self::Cluster(v) => write!(f, "Redis Cluster via {}", v.join(",")),
        }
    }
}

/// Connection and response time limits, and retries of a failed request.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub response: Duration,
    pub retries: usize,
}

/// A connection to one Redis server or to a Redis Cluster (commands routed by key).
#[derive(Clone)]
pub enum Redis {
    Server(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Redis {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Server(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Server(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Server(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}

/// Writes to several keys in one go (replies ignored, the first error returned).
#[derive(Default)]
pub struct Batch {
    /// Each command with the slot of its key.
    cmds: Vec<(Slot, Cmd)>,
}

impl Batch {
    pub fn new() -> Self {
        Self::default()
    }

    /// A command on `key`. The cluster client routes PUBLISH by its channel, as if it were a key:
    /// pass the channel.
    pub fn keyed(&mut self, key: &str, cmd: Cmd) -> &mut Self {
        self.cmds.push((Slot::for_key(key), cmd));
        self
    }

    fn groups(&self) -> Vec<(Slot, Vec<&Cmd>)> {
        let mut groups: Vec<(Slot, Vec<&Cmd>)> = Vec::new();
        for (slot, cmd) in &self.cmds {
            match groups.iter_mut().find(|(s, _)| s == slot) {
                Some((_, v)) => v.push(cmd),
                None => groups.push((*slot, vec![cmd])),
            }
        }
        groups
    }

    /// Sends the batch: one pipeline on a server (a transaction when `atomic`); in a cluster one
    /// pipeline per slot, concurrently, each a transaction when `atomic`.
    pub async fn exec(&self, con: &mut Redis, atomic: bool) -> RedisResult<()> {
        if self.cmds.is_empty() {
            return Ok(());
        }
        let pipe = |cmds: &[&Cmd]| {
            let mut p = redis::pipe();
            if atomic {
                p.atomic();
            }
            for c in cmds {
                p.add_command((*c).clone()).ignore();
            }
            p
        };
        match con {
            Redis::Server(_) => {
                let all: Vec<&Cmd> = self.cmds.iter().map(|(_, c)| c).collect();
                pipe(&all).exec_async(con).await
            }
            Redis::Cluster(c) => {
                let sends = self.groups().into_iter().map(|(_, cmds)| {
                    let p = pipe(&cmds);
                    let mut c = c.clone();
                    async move { p.exec_async(&mut c).await }
                });
                try_join_all(sends).await.map(|_| ())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_with_clear_errors() {
        assert_eq!(
            Target::parse("redis://a:1", false).unwrap(),
            Target::Server("redis://a:1".into())
        );
        assert_eq!(
            Target::parse("redis://a:1, redis://b:2", true).unwrap(),
            Target::Cluster(vec!["redis://a:1".into(), "redis://b:2".into()])
        );
        let e = Target::parse("redis://a:1,redis://b:2", false).unwrap_err();
        assert!(e.contains("--redis-cluster"), "{e}");
        let e = Target::parse("http://a", false).unwrap_err();
        assert!(e.contains("redis://127.0.0.1:6379"), "{e}");
        assert!(Target::parse(" , ", true).is_err());
    }

    #[test]
    fn a_nodes_keys_share_a_slot_and_a_batch_groups_by_slot() {
        use crate::keys;
        let node = "gpu-node-7";
        let slot = Slot::for_key(keys::telemetry_stream(node));
        assert_eq!(Slot::for_key(keys::latest(node)), slot);
        assert_eq!(Slot::for_key(keys::hint_state(node)), slot);
        assert_eq!(Slot::for_key(keys::stale_lock(node)), slot);
        let mut b = Batch::new();
        b.keyed(&keys::telemetry_stream(node), redis::cmd("XADD"))
            .keyed(&keys::latest(node), redis::cmd("PSETEX"))
            .keyed(keys::HINTS_CHANNEL, redis::cmd("PUBLISH"))
            .keyed(keys::NODES, redis::cmd("SADD"));
        let mut slots = vec![
            slot,
            Slot::for_key(keys::HINTS_CHANNEL),
            Slot::for_key(keys::NODES),
        ];
        slots.sort_by_key(|s| format!("{s:?}"));
        slots.dedup();
        assert_eq!(b.groups().len(), slots.len());
    }
}
