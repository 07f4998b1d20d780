//! Replicas that are gone: a hint-server replica that has not been seen for a minute is taken out
//! of every node's consumer group (with the windows it had read and not acknowledged), one gone for
//! less is not, and a replica that stops cleanly counts as gone for a minute at once.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use redis::{Commands, ConnectionLike};
use tokenflow_hint_server::store::REPLICA_FORGET_MS;
use tokenflow_schema::keys;
use tokenflow_tests::{
    hint_server::HintServer,
    redis_server::{RedisCluster, RedisServer},
};

const NODE: &str = "ghost-node";

/// The consumers of the node's stream in the hint servers' group, with their pending counts.
fn consumers(con: &mut impl ConnectionLike) -> Result<Vec<(String, u64)>> {
    let info: Vec<redis::Value> = redis::cmd("XINFO")
        .arg("CONSUMERS")
        .arg(keys::telemetry_stream(NODE))
        .arg(keys::HINT_GROUP)
        .query(con)?;
    info.into_iter()
        .map(|c| {
            let m: std::collections::HashMap<String, redis::Value> =
                redis::FromRedisValue::from_redis_value(c)?;
            let name: String =
                redis::FromRedisValue::from_redis_value(m.get("name").context("no name")?.clone())?;
            let pending: u64 = redis::FromRedisValue::from_redis_value(
                m.get("pending").context("no pending")?.clone(),
            )?;
            Ok((name, pending))
        })
        .collect()
}

/// The group's consumers once `done` holds for them, or as they are after 10 s.
fn consumers_once(
    con: &mut impl ConnectionLike,
    done: impl Fn(&[(String, u64)]) -> bool,
) -> Result<Vec<(String, u64)>> {
    let t0 = Instant::now();
    let mut now = consumers(con)?;
    while !done(&now) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        now = consumers(con)?;
    }
    Ok(now)
}

/// Redis' clock, ms (the replica set is timed by it).
fn redis_now_ms(con: &mut impl ConnectionLike) -> Result<u64> {
    // On the node that holds the replica set (in a cluster, TIME alone goes to any node).
    let (s, us): (u64, u64) = redis::cmd("EVAL")
        .arg("return redis.call('TIME')")
        .arg(1)
        .arg(keys::HINT_REPLICAS)
        .query(con)?;
    Ok(s * 1000 + us / 1000)
}

#[test]
fn a_replica_gone_for_a_minute_leaves_the_consumer_group() -> Result<()> {
    let redis = RedisServer::start_ephemeral()?;
    forgets_gone_replicas(&mut redis.client()?, &redis.url(), &[])
}

#[test]
fn a_replica_gone_for_a_minute_leaves_the_consumer_group_in_a_redis_cluster() -> Result<()> {
    let cluster = RedisCluster::start(3)?;
    let seeds: Vec<String> = cluster.nodes.iter().map(RedisServer::url).collect();
    let mut con = redis::cluster::ClusterClient::new(seeds)?.get_connection()?;
    forgets_gone_replicas(&mut con, &cluster.urls(), &["--redis-cluster"])
}

fn forgets_gone_replicas(con: &mut impl ConnectionLike, url: &str, extra: &[&str]) -> Result<()> {
    let stream = keys::telemetry_stream(NODE);
    let _: () = con.sadd(keys::NODES, NODE)?;
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg(keys::HINT_GROUP)
        .arg("0")
        .arg("MKSTREAM")
        .query(con)?;
    // Two replicas that crashed, each holding a window read and never acknowledged: one last
    // seen two minutes ago, one ten seconds ago.
    for (name, ago_ms) in [("crashed-long-ago", 120_000), ("crashed-just-now", 10_000)] {
        let _: String = con.xadd(&stream, "*", &[(keys::WINDOW_FIELD, "{}")])?;
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(keys::HINT_GROUP)
            .arg(name)
            .arg("COUNT")
            .arg(1)
            .arg("STREAMS")
            .arg(&stream)
            .arg(">")
            .query(con)?;
        let seen = redis_now_ms(con)? - ago_ms;
        let _: () = con.zadd(keys::HINT_REPLICAS, name, seen)?;
    }
    const { assert!(REPLICA_FORGET_MS > 10_000 && REPLICA_FORGET_MS < 120_000) };
    let before = consumers(con)?;
    anyhow::ensure!(
        before.len() == 2 && before.iter().all(|(_, p)| *p == 1),
        "set-up: {before:?}"
    );

    let a = HintServer::start(url, "t", &[&["--consumer", "replica-a"], extra].concat())?;
    // Something for it to read (not a window: it skips and acknowledges it), so that it joins the
    // group as a consumer.
    let _: String = con.xadd(&stream, "*", &[(keys::WINDOW_FIELD, "{}")])?;
    let now = consumers_once(con, |now| {
        !now.iter().any(|(n, _)| n == "crashed-long-ago")
            && now.iter().any(|(n, _)| n == "replica-a")
    })?;
    eprintln!("consumers after the replica started: {now:?}");
    anyhow::ensure!(
        !now.iter().any(|(n, _)| n == "crashed-long-ago"),
        "a replica gone for two minutes is still in the group: {now:?}"
    );
    anyhow::ensure!(
        now.iter().any(|(n, p)| n == "crashed-just-now" && *p == 1),
        "a replica gone for ten seconds was removed: {now:?}"
    );
    anyhow::ensure!(
        now.iter().any(|(n, _)| n == "replica-a"),
        "the running replica does not read through the group: {now:?}"
    );
    let set: Vec<String> = con.zrange(keys::HINT_REPLICAS, 0, -1)?;
    anyhow::ensure!(
        set.contains(&"replica-a".to_string()) && !set.contains(&"crashed-long-ago".to_string()),
        "replica set: {set:?}"
    );

    // A clean stop: the replica counts as gone for a minute at once, and the next replica's first
    // heartbeat takes it out of the group.
    drop(a);
    let score: f64 = con.zscore(keys::HINT_REPLICAS, "replica-a")?;
    let age = redis_now_ms(con)? as f64 - score;
    anyhow::ensure!(
        age > REPLICA_FORGET_MS as f64,
        "a replica that stopped cleanly was last seen {age} ms ago, not marked gone"
    );
    let _b = HintServer::start(url, "t", &[&["--consumer", "replica-b"], extra].concat())?;
    let now = consumers_once(con, |now| !now.iter().any(|(n, _)| n == "replica-a"))?;
    eprintln!("consumers after a clean stop and a new replica: {now:?}");
    anyhow::ensure!(
        !now.iter().any(|(n, _)| n == "replica-a"),
        "a replica that stopped cleanly is still in the group: {now:?}"
    );
    Ok(())
}

/// A Redis that refuses scripts (EVAL renamed away, as some managed services do): the heartbeat
/// fails, and the replica still reads every node's windows through the consumer group.
#[test]
fn a_redis_that_refuses_scripts_still_has_its_windows_read() -> Result<()> {
    let redis = RedisServer::start_ephemeral_with(&["--rename-command", "EVAL", ""])?;
    let mut con = redis.client()?;
    let refused: redis::RedisResult<u64> =
        redis::cmd("EVAL").arg("return 1").arg(0).query(&mut con);
    anyhow::ensure!(refused.is_err(), "set-up: EVAL still answers");
    let _: () = con.sadd(keys::NODES, NODE)?;
    let _a = HintServer::start(&redis.url(), "t", &["--consumer", "replica-a"])?;
    // Let the replica create the group on the node's stream, then give it something to read.
    let stream = keys::telemetry_stream(NODE);
    let t0 = Instant::now();
    while !con.exists::<_, bool>(&stream)? && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let _: String = con.xadd(&stream, "*", &[(keys::WINDOW_FIELD, "{}")])?;
    let now = consumers_once(&mut con, |now| {
        now.iter().any(|(n, p)| n == "replica-a" && *p == 0)
    })?;
    anyhow::ensure!(
        now.iter().any(|(n, p)| n == "replica-a" && *p == 0),
        "with the heartbeat refused the replica read nothing: {now:?}"
    );
    Ok(())
}
