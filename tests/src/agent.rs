//! `tokenflow-agent` as a real subprocess: windows are read from its stdout as it prints them.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokenflow_schema::TelemetryWindow;

/// The agent binary next to the test executable (`target/<profile>/tokenflow-agent`).
pub fn agent_binary() -> Result<PathBuf> {
    sibling_binary("tokenflow-agent")
}

/// A workspace binary next to the test executable (`target/<profile>/<name>`).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // Test executables live in target/<profile>/deps, binaries such as xtask in target/<profile>.
    let mut dir = exe.parent().context("executable without a directory")?;
    if dir.ends_with("deps") {
        dir = dir.parent().context("deps without a parent")?;
    }
    let bin = dir.join(name);
    if !bin.exists() {
        bail!(
            "{} missing: build it first (`cargo build`; `cargo xtask test` does this)",
            bin.display()
        );
    }
    Ok(bin)
}

pub struct Agent {
    child: Child,
    windows: Arc<Mutex<Vec<TelemetryWindow>>>,
    reader: Option<JoinHandle<()>>,
    stderr: Option<JoinHandle<String>>,
}

impl Agent {
    /// Starts the agent with `args` and waits until it has attached (its "capture attached" log line).
    pub fn start(args: &[&str]) -> Result<Self> {
        Self::start_binary(&agent_binary()?, args)
    }

    /// As [`Agent::start`], with an explicit binary (the benchmark uses the release build).
    pub fn start_binary(bin: &std::path::Path, args: &[&str]) -> Result<Self> {
        let mut child = Command::new(bin)
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("spawning tokenflow-agent")?;
        let stdout = child.stdout.take().context("agent stdout")?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let windows = Arc::new(Mutex::new(Vec::new()));
        let sink = windows.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                match serde_json::from_str::<TelemetryWindow>(&line) {
                    Ok(w) => sink.lock().unwrap_or_else(|p| p.into_inner()).push(w),
                    Err(e) => eprintln!("agent printed a line that is not a window ({e}): {line}"),
                }
            }
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let stderr = std::thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("capture attached") {
                    let _ = ready_tx.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let mut agent = Self {
            child,
            windows,
            reader: Some(reader),
            stderr: Some(stderr),
        };
        if ready_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            let log = agent.stop_and_log();
            bail!("agent did not attach within 20 s; its log:\n{log}");
        }
        Ok(agent)
    }

    pub fn pid(&self) -> Pid {
        Pid::from_raw(self.child.id() as i32)
    }

    pub fn windows(&self) -> Vec<TelemetryWindow> {
        self.windows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The newest window, if any has arrived.
    pub fn latest_window(&self) -> Option<TelemetryWindow> {
        self.windows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .cloned()
    }

    /// Waits until at least `n` windows have arrived.
    pub fn wait_windows(&self, n: usize, timeout: Duration) -> Result<Vec<TelemetryWindow>> {
        let t0 = Instant::now();
        loop {
            let w = self.windows();
            if w.len() >= n {
                return Ok(w);
            }
            if t0.elapsed() > timeout {
                bail!("only {} of {n} windows after {timeout:?}", w.len());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `sig` and waits for exit; returns how long the exit took.
    pub fn signal_and_wait(&mut self, sig: Signal, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        kill(self.pid(), sig)?;
        loop {
            if let Some(status) = self.child.try_wait()? {
                let took = t0.elapsed();
                if sig == Signal::SIGTERM && !status.success() {
                    bail!("agent exited with {status} after SIGTERM:\n{}", self.log());
                }
                self.join_readers();
                return Ok(took);
            }
            if t0.elapsed() > timeout {
                bail!("agent still running {timeout:?} after {sig}");
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn join_readers(&mut self) {
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }

    fn log(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default()
    }

    fn stop_and_log(&mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.join_readers();
        self.log()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
