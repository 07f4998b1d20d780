//! `tokenflow-hint-server serve` as a real subprocess, and a minimal HTTP/1.1 client for it.

use std::{
    io::{Read, Write},
    net::{SocketAddr, TcpStream},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use crate::redis_server::free_port;

pub struct HintServer {
    child: Child,
    pub addr: SocketAddr,
    pub metrics: SocketAddr,
}

impl HintServer {
    /// Starts the server next to the test executable on free ports and waits for `/healthz`.
    /// A port found free can still be taken before the server binds it (by a test binary running
    /// beside this one; [`free_port`] keeps out of the range outgoing connections take theirs
    /// from): a server that exits before it answers is started again on other ports, up to three
    /// times.
    pub fn start(redis_url: &str, token: &str, extra: &[&str]) -> Result<Self> {
        let bin = crate::agent::sibling_binary("tokenflow-hint-server")?;
        for attempt in 1..=3 {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
            let metrics: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
            let mut child = Command::new(&bin)
                .arg("serve")
                .args(["--redis", redis_url, "--listen", &addr.to_string()])
                .args(["--metrics-addr", &metrics.to_string(), "--token", token])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            let t0 = Instant::now();
            let exited = loop {
                if http(addr, "GET", "/healthz", None, None).is_ok_and(|(c, _)| c == 200) {
                    return Ok(Self {
                        child,
                        addr,
                        metrics,
                    });
                }
                if let Some(status) = child.try_wait()? {
                    break status;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    // Dropped as a HintServer: stopped and reaped.
                    drop(Self {
                        child,
                        addr,
                        metrics,
                    });
                    bail!("the hint server did not answer /healthz within 10 s");
                }
                std::thread::sleep(Duration::from_millis(100));
            };
            eprintln!(
                "the hint server exited ({exited}) before answering on {addr} (attempt {attempt} of 3)"
            );
        }
        bail!("the hint server exited before answering, three times (its error is above)")
    }

    /// One request; returns the status code and body.
    pub fn request(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&str>,
    ) -> Result<(u16, String)> {
        http(self.addr, method, path, token, body)
    }

    /// Kills the server at once (SIGKILL), as a crash would: it tidies nothing up.
    pub fn crash(mut self) -> Result<()> {
        self.child.kill().context("killing the hint server")?;
        self.child.wait()?;
        Ok(())
    }
}

impl Drop for HintServer {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(3) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 request with `Connection: close`: status and body.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, String)> {
    http_with_head(addr, method, path, token, body).map(|(code, _, body)| (code, body))
}

/// As [`http`], with the response's head (status line and headers) as well.
pub fn http_with_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Result<(u16, String, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let code = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((out.as_str(), ""));
    Ok((code, head.to_string(), body.to_string()))
}

/// Waits until `GET path` answers 200.
pub fn wait_http(addr: SocketAddr, path: &str, within: Duration) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < within {
        if http(addr, "GET", path, None, None).is_ok_and(|(c, _)| c == 200) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{addr}{path} did not answer within {within:?}")
}
