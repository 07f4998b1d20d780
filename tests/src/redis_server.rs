//! A real `redis-server` on 127.0.0.1 with its own temporary directory, for tests that need to kill
//! and restart it. Persistence (AOF, fsync always) is on, so a restart loses nothing that was written.

use std::{
    net::TcpStream,
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

pub struct RedisServer {
    pub port: u16,
    dir: PathBuf,
    child: Option<Child>,
    persist: bool,
    /// Further `redis-server` arguments.
    extra: Vec<String>,
}

/// A free loopback port for a test server to listen on: checked free by binding it, handed out once
/// per process, and taken from below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`).
/// A port the kernel picks for `bind(0)` comes from that range, and so does every outgoing
/// connection's source port: one such connection took the port between the check and the server's
/// bind, and CI failed on "Address already in use".
pub fn free_port() -> Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_from = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let span = ephemeral_from.saturating_sub(FIRST);
    if span < 1000 {
        // An ephemeral range reaching down to the well-known ports leaves nothing outside it.
        return Ok(std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port());
    }
    // Processes start at different points, so that test binaries run side by side rarely meet.
    let start = std::process::id().wrapping_mul(7919) % span;
    for _ in 0..span {
        let port = FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(port)?;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free port in {FIRST}..{ephemeral_from} on 127.0.0.1")
}

impl RedisServer {
    /// With persistence (AOF, fsync always): a restart after SIGKILL loses nothing written.
    pub fn start() -> Result<Self> {
        Self::launch(true, &[])
    }

    /// Without persistence: for benchmarks, where fsync per write would be measured instead of Redis.
    pub fn start_ephemeral() -> Result<Self> {
        Self::launch(false, &[])
    }

    /// Without persistence, with further `redis-server` arguments (`--rename-command EVAL ""`).
    pub fn start_ephemeral_with(extra: &[&str]) -> Result<Self> {
        Self::launch(false, extra)
    }

    /// A server with further `redis-server` arguments (cluster mode).
    fn launch(persist: bool, extra: &[&str]) -> Result<Self> {
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("tokenflow-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut s = Self {
            port,
            dir,
            child: None,
            persist,
            extra: extra.iter().map(|a| a.to_string()).collect(),
        };
        s.restart()?;
        Ok(s)
    }

    /// Process id of the running server.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port and directory; waits until it accepts connections.
    pub fn restart(&mut self) -> Result<()> {
        let child = Command::new("redis-server")
            .args([
                "--bind",
                "127.0.0.1",
                "--port",
                &self.port.to_string(),
                "--save",
                "",
            ])
            .args(if self.persist {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "no"]
            })
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (cargo xtask setup installs it)")?;
        self.child = Some(child);
        let t0 = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if t0.elapsed() > Duration::from_secs(10) {
                bail!("redis-server did not listen on {} within 10 s", self.port);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// SIGKILL: an outage, not a shutdown.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn client(&self) -> Result<redis::Connection> {
        Ok(redis::Client::open(self.url())?.get_connection()?)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A real Redis Cluster on 127.0.0.1: three `redis-server` masters (no replicas, no persistence)
/// joined with `redis-cli --cluster create`, the 16,384 slots split between them.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(masters: usize) -> Result<Self> {
        let mut nodes = Vec::with_capacity(masters);
        for _ in 0..masters {
            let s = RedisServer::launch(
                false,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                ],
            )?;
            nodes.push(s);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .context(
                "running redis-cli --cluster create (cargo xtask setup installs redis-tools)",
            )?;
        anyhow::ensure!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes };
        let t0 = Instant::now();
        while !cluster.is_ok()? {
            if t0.elapsed() > Duration::from_secs(20) {
                bail!("the Redis Cluster did not reach cluster_state:ok within 20 s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(cluster)
    }

    /// Every node reports `cluster_state:ok` and knows every slot.
    fn is_ok(&self) -> Result<bool> {
        for n in &self.nodes {
            let info: String = redis::cmd("CLUSTER").arg("INFO").query(&mut n.client()?)?;
            if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The seed URLs, comma-separated (`--redis` with `--redis-cluster`).
    pub fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(RedisServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Keys held by each node (DBSIZE), in node order.
    pub fn keys_per_node(&self) -> Result<Vec<u64>> {
        self.nodes
            .iter()
            .map(|n| Ok(redis::cmd("DBSIZE").query(&mut n.client()?)?))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::free_port;

    #[test]
    fn free_ports_are_distinct_bindable_and_outside_the_ephemeral_range() {
        let ephemeral_from: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let ports: Vec<u16> = (0..50).map(|_| free_port().unwrap()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(
            unique.len(),
            ports.len(),
            "a port was handed out twice: {ports:?}"
        );
        for p in ports {
            assert!(p < ephemeral_from, "{p} is in the ephemeral range");
            std::net::TcpListener::bind(("127.0.0.1", p)).unwrap();
        }
    }
}
