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
}

/// A free loopback port (bound and released; good enough for a test).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl RedisServer {
    /// With persistence (AOF, fsync always): a restart after SIGKILL loses nothing written.
    pub fn start() -> Result<Self> {
        Self::launch(true)
    }

    /// Without persistence: for benchmarks, where fsync per write would be measured instead of Redis.
    pub fn start_ephemeral() -> Result<Self> {
        Self::launch(false)
    }

    fn launch(persist: bool) -> Result<Self> {
        let port = free_port()?;
        let dir =
            std::env::temp_dir().join(format!("tokenflow-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut s = Self {
            port,
            dir,
            child: None,
            persist,
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
