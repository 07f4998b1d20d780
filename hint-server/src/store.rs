//! Everything the hint server keeps in Redis, so that replicas share it: client settings, each
//! client's current hint, each node's state, the pub/sub channel of new hints.

use std::{collections::HashMap, time::Duration};

use anyhow::{Context, Result};
use redis::{
    AsyncCommands, Client,
    aio::{ConnectionManager, ConnectionManagerConfig},
};
use tokenflow_schema::{ClientConfig, Hint, NodeSummary, keys};

use crate::engine::NodeState;

#[derive(Clone)]
pub struct Store {
    pub client: Client,
    pub con: ConnectionManager,
}

impl Store {
    pub async fn connect(url: &str) -> Result<Self> {
        let client = Client::open(url).with_context(|| format!("{url} is not a Redis URL"))?;
        let con = manager(&client, Duration::from_secs(2)).await?;
        Ok(Self { client, con })
    }

    /// A second connection for blocking reads (XREADGROUP BLOCK), which would hold up every
    /// other command on a shared multiplexed connection.
    pub async fn blocking_connection(&self) -> Result<ConnectionManager> {
        manager(&self.client, Duration::from_secs(10)).await
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

    /// Removes a client's settings and its hint; false when it was not registered.
    pub async fn delete_client(&self, id: &str) -> Result<bool> {
        let (removed, _): (u32, u32) = redis::pipe()
            .atomic()
            .hdel(keys::CLIENTS, id)
            .del(keys::hint(id))
            .query_async(&mut self.con.clone())
            .await?;
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

    /// Stores a node's state and its clients' hints in one transaction, then publishes the hints.
    pub async fn commit(&self, node: &str, st: &NodeState, hints: &[Hint]) -> Result<()> {
        let mut p = redis::pipe();
        p.atomic();
        p.set(keys::hint_state(node), serde_json::to_string(st)?)
            .ignore();
        for h in hints {
            let json = serde_json::to_string(h)?;
            p.pset_ex(keys::hint(&h.client_id), &json, h.ttl_ms.max(1))
                .ignore();
            p.publish(keys::HINTS_CHANNEL, &json).ignore();
        }
        let _: () = p.query_async(&mut self.con.clone()).await?;
        Ok(())
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

async fn manager(client: &Client, response: Duration) -> Result<ConnectionManager> {
    let cfg = ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(response))
        .set_number_of_retries(2);
    ConnectionManager::new_with_config(client.clone(), cfg)
        .await
        .context("connecting to Redis (is it running? see --redis)")
}
