//! Helpers for the privileged integration tests: root gating (a skip fails under `CI=true`), one test at
//! a time, the agent as a real subprocess, TCP endpoints inside test-bed namespaces, and `ss` as oracle.

pub mod agent;
pub mod backend;
pub mod bpf;
pub mod hint_server;
pub mod redis_server;
pub mod ss;

use std::sync::{Mutex, MutexGuard};

/// Privileged tests share the kernel (programs, namespaces): one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the serial lock; `None` means "skip" (not root, outside CI).
pub struct Privileged(#[allow(dead_code)] MutexGuard<'static, ()>);

/// Returns the lock when the test can run. Without root it prints why it skips, and under
/// `CI=true` it fails instead: CI must never pass by skipping.
pub fn privileged(test: &str) -> Option<Privileged> {
    if !nix::unistd::geteuid().is_root() {
        let msg =
            format!("{test}: needs root (eBPF, network namespaces); run `sudo cargo xtask test`");
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("{msg} — refusing to skip under CI=true");
        }
        eprintln!("SKIP {msg}");
        return None;
    }
    let guard = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    Some(Privileged(guard))
}

/// A child process killed (and reaped) when dropped, so a failing test leaves nothing running.
pub struct ChildGuard(pub std::process::Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The text of a Prometheus endpoint (`GET /metrics`), headers included.
pub fn scrape_metrics(addr: std::net::SocketAddr) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut body = String::new();
    s.read_to_string(&mut body)?;
    Ok(body)
}
