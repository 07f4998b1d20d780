//! Everything one demo run stands on: the test bed, Redis, the agent, the hint server, the backend
//! and the neighbour's probe. Dropping a [`Stack`] stops and removes all of it.

use std::{
    net::{SocketAddr, SocketAddrV4},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tokenflow_testbed::{MGMT_HOST_ADDR, SERVER_ADDR, Testbed, in_netns, traffic::EchoProbe};
use tokenflow_tests::{
    agent::Agent,
    hint_server::http,
    redis_server::{RedisServer, free_port},
};

pub const BACKEND_PORT: u16 = 8000;
pub const PROBE_PORT: u16 = 5202;
pub const NODE: &str = "demo";
pub const TOKEN: &str = "demo-token";

/// A child process that is stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        use std::os::unix::process::CommandExt;
        // Its own process group: Ctrl-C reaches only xtask, which stops children in order. And
        // should xtask die without that (a second Ctrl-C, a kill), the kernel stops the child.
        // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe and touches no memory of ours.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = cmd
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self { child })
    }

    pub fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

pub struct Bins {
    pub dir: PathBuf,
}

impl Bins {
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// Fields drop in order: the backend and the probe first, the test bed last.
pub struct Stack {
    pub backend: Option<Proc>,
    pub probe: EchoProbe,
    _hints: Proc,
    pub hint_addr: SocketAddr,
    pub agent: Agent,
    _redis: RedisServer,
    pub bed: Testbed,
    pub model_dir: PathBuf,
    pub model_name: String,
    pub bins: Bins,
}

impl Stack {
    pub fn start(bins: Bins, out: &Path, say: &dyn Fn(String)) -> Result<Self> {
        let mut bed = Testbed::create("demo")?;
        bed.set_delay(Duration::from_millis(10))?;
        bed.add_management_link()?;
        bed.add_server_addr_2()?;
        say(format!(
            "test bed {} — {} — {} (+10 ms one way), management link {MGMT_HOST_ADDR}",
            bed.client, bed.router, bed.server
        ));
        let redis = RedisServer::start_ephemeral()?;
        say(format!("redis-server on {}", redis.url()));
        let redis_url = redis.url();
        let netns = format!("/run/netns/{}", bed.client);
        // The backend's markers, paired per request: time queued in the backend, prefill, and the
        // whole service (scheduled → finished). The hint server's compute limit reads them.
        let backend_bin = bins.path("tokenflow-backend");
        let span = |a: &str, b: &str, label: &str| {
            format!(
                "{}:tokenflow_backend_{a}..tokenflow_backend_{b}:{label}",
                backend_bin.display()
            )
        };
        let spans = [
            span("request_start", "scheduled", "queue"),
            span("scheduled", "first_token", "prefill"),
            span("scheduled", "request_end", "service"),
        ];
        let mut args = vec![
            "--interval",
            "1s",
            "--netns",
            &netns,
            "--node-id",
            NODE,
            "--redis",
            &redis_url,
            "--metrics-addr",
            "off",
            "--sink",
            "stdout",
        ];
        for s in &spans {
            args.extend(["--span", s.as_str()]);
        }
        let agent = Agent::start_binary(&bins.path("tokenflow-agent"), &args)?;
        say(
            "agent attached (tracepoints in the client namespace; spans on the backend's markers)"
                .into(),
        );
        let model_file = out.join("hint-model.json");
        crate::util::run(
            Command::new(bins.path("tokenflow-hint-server"))
                .args(["train", "--trace"])
                .arg(crate::util::root().join("hint-server/fixtures/trace.jsonl"))
                .arg("--out")
                .arg(&model_file)
                .stdout(Stdio::null()),
        )?;
        let hint_addr: SocketAddr = format!("{MGMT_HOST_ADDR}:{}", free_port()?).parse()?;
        let hints = Proc::spawn(
            "tokenflow-hint-server",
            Command::new(bins.path("tokenflow-hint-server"))
                .args(["serve", "--redis", &redis.url()])
                .args(["--listen", &hint_addr.to_string(), "--metrics-addr", "off"])
                .args(["--token", TOKEN, "--interval", "1s", "--model"])
                .arg(&model_file)
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(out.join("hint-server.log"))?),
        )?;
        wait_http(hint_addr, "/healthz", None, "the hint server")?;
        say(format!(
            "hint server on http://{hint_addr} (models trained on the recorded trace)"
        ));
        let model_dir = out.join("model");
        crate::util::run(
            Command::new(bins.path("tokenflow-backend"))
                .args(["init-model", "--size", "tiny", "--out"])
                .arg(&model_dir)
                .stdout(Stdio::null()),
        )?;
        let model_name = model_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let probe = EchoProbe::start(
            &bed.client,
            &bed.server,
            SocketAddr::V4(SocketAddrV4::new(SERVER_ADDR, PROBE_PORT)),
            Duration::from_millis(20),
        )?;
        say("probe: a 16-byte echo every 20 ms, the neighbour's round trip".into());
        Ok(Self {
            backend: None,
            probe,
            _hints: hints,
            hint_addr,
            agent,
            _redis: redis,
            bed,
            model_dir,
            model_name,
            bins,
        })
    }

    /// (Re)starts the backend in the server namespace with these scheduler limits.
    pub fn start_backend(&mut self, max_running: u32, max_waiting: u32, log: &Path) -> Result<()> {
        self.backend = None;
        let p = Proc::spawn(
            "tokenflow-backend",
            self.bed
                .exec(
                    &self.bed.server,
                    &self.bins.path("tokenflow-backend").to_string_lossy(),
                )
                .args(["serve", "--model"])
                .arg(&self.model_dir)
                .args(["--listen", &format!("0.0.0.0:{BACKEND_PORT}")])
                .args(["--max-running", &max_running.to_string()])
                .args(["--max-waiting", &max_waiting.to_string()])
                .args(["--threads", &backend_threads().to_string()])
                .env("RUST_LOG", "warn")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(log)?),
        )?;
        self.backend = Some(p);
        let ns = self.bed.server.clone();
        let t0 = Instant::now();
        loop {
            let ns = ns.clone();
            let ok = in_netns(&ns, move || {
                http(
                    SocketAddr::V4(SocketAddrV4::new(SERVER_ADDR, BACKEND_PORT)),
                    "GET",
                    "/health",
                    None,
                    None,
                )
            })
            .is_ok_and(|(c, _)| c == 200);
            if ok {
                return Ok(());
            }
            if t0.elapsed() > Duration::from_secs(30) {
                bail!(
                    "the backend did not answer /health within 30 s (see {})",
                    log.display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn set_rate(&self, kbit: u64, buffer_ms: u64) -> Result<()> {
        self.bed
            .set_bottleneck(kbit, Duration::from_millis(buffer_ms))
    }

    /// `PUT /v1/clients/{id}`.
    pub fn register(&self, id: &str, body: &serde_json::Value) -> Result<()> {
        let (code, text) = http(
            self.hint_addr,
            "PUT",
            &format!("/v1/clients/{id}"),
            Some(TOKEN),
            Some(&body.to_string()),
        )?;
        anyhow::ensure!(code == 200, "registering {id}: {code} {text}");
        Ok(())
    }

    /// `DELETE /v1/clients/{id}`: the finished run's clients stop taking a share of the node.
    pub fn deregister(&self, id: &str) -> Result<()> {
        let (code, text) = http(
            self.hint_addr,
            "DELETE",
            &format!("/v1/clients/{id}"),
            Some(TOKEN),
            None,
        )?;
        anyhow::ensure!(code == 204, "removing {id}: {code} {text}");
        Ok(())
    }

    /// The client's current hint, if any.
    pub fn hint(&self, id: &str) -> Option<tokenflow_schema::Hint> {
        let (code, body) = http(
            self.hint_addr,
            "GET",
            &format!("/v1/hints/{id}"),
            None,
            None,
        )
        .ok()?;
        (code == 200)
            .then(|| serde_json::from_str(&body).ok())
            .flatten()
    }
}

fn wait_http(addr: SocketAddr, path: &str, token: Option<&str>, what: &str) -> Result<()> {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(15) {
        if http(addr, "GET", path, token, None).is_ok_and(|(c, _)| c == 200) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("{what} did not answer {path} within 15 s")
}

/// The model's CPU threads: half the machine's cores. The other half runs what measures and drives
/// the test bed (pacer, agent, Redis, hint server, probe, the router's queues); with the model on
/// every core, whichever arm's client side did more work took it from the model — on this 2-core
/// machine every paced arm, baselines included, served 85–95 % of the unpaced arm's tokens/s with
/// two threads and 102–103 % with one (`compute-bound`, 2 repeats each).
fn backend_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}
