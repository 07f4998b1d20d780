//! Command line of `tokenflow-agent`, with environment-variable fallbacks for every flag.

use std::{os::unix::fs::MetadataExt, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, ValueEnum, parser::ValueSource};
use serde::Deserialize;

use tokenflow_schema::store::Target;

use crate::capture::Filter;

/// TokenFlow node agent: measures every TCP connection from the kernel (RTT, retransmits,
/// state changes) and emits one JSON telemetry window per interval.
///
/// Needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN). Stops cleanly on Ctrl-C or SIGTERM:
/// the last window is flushed and every kernel program is detached.
#[derive(Debug, Parser)]
#[command(name = "tokenflow-agent", version, about, long_about)]
pub struct Args {
    /// Name of this node in every window.
    #[arg(long, env = "TOKENFLOW_NODE_ID", default_value_t = default_node_id())]
    pub node_id: String,

    /// Length of one window (e.g. 1s, 500ms).
    #[arg(long, env = "TOKENFLOW_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub interval: Duration,

    /// Stop after this long (e.g. 5s, 10m); runs until Ctrl-C when absent.
    #[arg(long, env = "TOKENFLOW_DURATION", value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,

    /// Print windows to standard output (one JSON window per line). On by default when no Redis URL is given.
    #[arg(long, env = "TOKENFLOW_SINK", value_enum)]
    pub sink: Option<Sink>,

    /// Write windows to this Redis (stream `tokenflow:telemetry:{<node-id>}`, key `tokenflow:latest:{<node-id>}`);
    /// with --redis-cluster, one or more comma-separated seed nodes of a Redis Cluster.
    #[arg(long, env = "TOKENFLOW_REDIS")]
    pub redis: Option<String>,

    /// --redis names a Redis Cluster (the node's keys share one hash slot, the node set lives on another).
    #[arg(long, env = "TOKENFLOW_REDIS_CLUSTER")]
    pub redis_cluster: bool,

    /// Keep stream entries this long (trimmed with XADD MINID ~).
    #[arg(long, env = "TOKENFLOW_REDIS_RETENTION", default_value = "24h", value_parser = humantime::parse_duration)]
    pub redis_retention: Duration,

    /// Windows held in memory while Redis is unreachable (default: 10 minutes of 1 s windows); beyond it the
    /// oldest are dropped and counted.
    #[arg(long, env = "TOKENFLOW_REDIS_BUFFER", default_value_t = 600)]
    pub redis_buffer: usize,

    /// Serve Prometheus metrics here (`off` disables).
    #[arg(long, env = "TOKENFLOW_METRICS_ADDR", default_value = "127.0.0.1:9464")]
    pub metrics_addr: String,

    /// Watch only flows with this local or remote port (repeat or comma-separate).
    #[arg(long = "port", env = "TOKENFLOW_PORTS", value_delimiter = ',')]
    pub ports: Vec<u16>,

    /// Watch only flows whose remote address is in this network, e.g. 10.0.0.0/8 (repeat or comma-separate).
    #[arg(long = "cidr", env = "TOKENFLOW_CIDRS", value_delimiter = ',')]
    pub cidrs: Vec<ipnet::IpNet>,

    /// Watch only sockets in this network namespace: a path (/run/netns/NAME, /proc/PID/ns/net) or an inode number.
    #[arg(long, env = "TOKENFLOW_NETNS")]
    pub netns: Option<String>,

    /// Watch only sockets of this cgroup: a cgroup v2 directory (/sys/fs/cgroup/...) or a cgroup id.
    #[arg(long, env = "TOKENFLOW_CGROUP")]
    pub cgroup: Option<String>,

    /// Kernel BTF used to locate the socket fields the kernel programs read (required).
    #[arg(long, env = "TOKENFLOW_BTF", default_value = crate::btf_offsets::VMLINUX_BTF)]
    pub btf: PathBuf,

    /// Time a function of a binary, entry to return, per thread: PATH:SYMBOL[:LABEL]. SYMBOL is the
    /// ELF name or a demangled Rust/C++ path (e.g. `my_server::handlers::generate`). Repeatable.
    #[arg(long = "uprobe", env = "TOKENFLOW_UPROBES", value_delimiter = ',')]
    pub uprobes: Vec<crate::uprobe_target::UprobeSpec>,

    /// Time from one marker function to another for the same request, paired by the markers'
    /// first integer argument: PATH:START..END[:LABEL]. For tokenflow-backend, e.g.
    /// `BIN:tokenflow_backend_request_start..tokenflow_backend_scheduled:queue` and
    /// `BIN:tokenflow_backend_scheduled..tokenflow_backend_first_token:prefill`. Repeatable.
    #[arg(long = "span", env = "TOKENFLOW_SPANS", value_delimiter = ',')]
    pub spans: Vec<crate::uprobe_target::SpanSpec>,

    /// Print one GPU sample (NVML) as JSON and exit; needs no privileges.
    #[arg(long)]
    pub gpu_check: bool,

    /// TOML file with any of the options above (kebab-case keys, e.g. `node-id = "gpu-7"`,
    /// `ports = [8000]`); flags and environment variables take precedence over it.
    #[arg(long, env = "TOKENFLOW_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Sink {
    /// One JSON window per line on standard output.
    Stdout,
}

fn default_node_id() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "node".to_string())
}

impl Args {
    /// Stdout when asked for, or when there is no other place for the windows to go.
    pub fn stdout(&self) -> bool {
        self.sink == Some(Sink::Stdout) || (self.sink.is_none() && self.redis.is_none())
    }

    /// Where windows go in Redis, `None` without --redis.
    pub fn redis_target(&self) -> Result<Option<Target>> {
        self.redis
            .as_deref()
            .map(|urls| {
                Target::parse(urls, self.redis_cluster).map_err(|e| anyhow::anyhow!("--redis: {e}"))
            })
            .transpose()
    }

    /// The metrics address, `None` when disabled.
    pub fn metrics_addr(&self) -> Result<Option<std::net::SocketAddr>> {
        if self.metrics_addr == "off" {
            return Ok(None);
        }
        self.metrics_addr.parse().map(Some).with_context(|| {
            format!(
                "--metrics-addr {:?}: expected ip:port or off",
                self.metrics_addr
            )
        })
    }

    pub fn filter(&self) -> Result<Filter> {
        Ok(Filter {
            ports: self.ports.clone(),
            cidrs: self.cidrs.clone(),
            netns: self
                .netns
                .as_deref()
                .map(inode_or_number::<u32>)
                .transpose()
                .context("--netns")?,
            cgroup_id: self
                .cgroup
                .as_deref()
                .map(inode_or_number::<u64>)
                .transpose()
                .context("--cgroup")?,
        })
    }
}

/// A number as given, or the inode number of the path (the netns inode; on cgroup v2, the cgroup id).
fn inode_or_number<T: TryFrom<u64> + std::str::FromStr>(s: &str) -> Result<T> {
    if let Ok(n) = s.parse::<T>() {
        return Ok(n);
    }
    let ino = std::fs::metadata(s)
        .with_context(|| format!("{s} is neither a number nor an existing path"))?
        .ino();
    T::try_from(ino).map_err(|_| anyhow::anyhow!("inode {ino} of {s} does not fit"))
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Args::command().debug_assert();
    }

    #[test]
    fn parses_durations_and_ports() {
        let a = Args::try_parse_from([
            "x",
            "--interval",
            "500ms",
            "--duration",
            "5s",
            "--port",
            "80,443",
        ])
        .unwrap();
        assert_eq!(a.interval, Duration::from_millis(500));
        assert_eq!(a.duration, Some(Duration::from_secs(5)));
        assert_eq!(a.ports, vec![80, 443]);
    }

    #[test]
    fn netns_accepts_number_or_path() {
        assert_eq!(inode_or_number::<u32>("4026531840").unwrap(), 4026531840);
        let own = std::fs::metadata("/proc/self/ns/net").unwrap().ino();
        assert_eq!(inode_or_number::<u64>("/proc/self/ns/net").unwrap(), own);
        let err = inode_or_number::<u32>("/no/such/ns").unwrap_err();
        assert!(format!("{err:#}").contains("/no/such/ns"));
    }

    #[test]
    fn config_file_fills_what_flags_leave_unset() {
        let dir = std::env::temp_dir().join(format!("tf-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(&path, "node-id = \"gpu-7\"\ninterval = \"2s\"\nports = [8000, 8001]\nmetrics-addr = \"off\"\n").unwrap();
        let p = path.to_str().unwrap();
        let a = Args::load_from(["x", "--config", p, "--interval", "500ms"]).unwrap();
        assert_eq!(a.node_id, "gpu-7");
        assert_eq!(
            a.interval,
            Duration::from_millis(500),
            "the flag wins over the file"
        );
        assert_eq!(a.ports, vec![8000, 8001]);
        assert_eq!(a.metrics_addr().unwrap(), None);
        std::fs::write(&path, "node_idd = 1\n").unwrap();
        let err = Args::load_from(["x", "--config", p])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("unknown field") && err.contains("node_idd"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_values_fail_validation() {
        assert!(Args::load_from(["x", "--metrics-addr", "nowhere"]).is_err());
        assert!(Args::load_from(["x", "--redis", "http://x"]).is_err());
        assert!(Args::load_from(["x", "--redis-buffer", "0"]).is_err());
    }

    #[test]
    fn bad_interval_is_rejected() {
        assert!(Args::try_parse_from(["x", "--interval", "soon"]).is_err());
    }
}

/// The config file: every key optional, unknown keys rejected.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct FileConfig {
    node_id: Option<String>,
    interval: Option<String>,
    duration: Option<String>,
    sink: Option<Sink>,
    redis: Option<String>,
    redis_cluster: Option<bool>,
    redis_retention: Option<String>,
    redis_buffer: Option<usize>,
    metrics_addr: Option<String>,
    ports: Option<Vec<u16>>,
    cidrs: Option<Vec<ipnet::IpNet>>,
    uprobes: Option<Vec<String>>,
    spans: Option<Vec<String>>,
    netns: Option<String>,
    cgroup: Option<String>,
    btf: Option<PathBuf>,
}

/// A setting that makes no sense: reported in one line, exit code 2.
#[derive(Debug, thiserror::Error)]
#[error("{0:#}")]
pub struct ConfigError(pub anyhow::Error);

impl Args {
    /// Parses flags, environment and the config file (clap prints its own errors and exits 2), then
    /// checks every value that can be checked without privileges.
    pub fn load() -> Result<Self, ConfigError> {
        Self::load_from(std::env::args_os())
    }

    pub fn load_from<I, T>(argv: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command().get_matches_from(argv);
        let mut args = Self::from_arg_matches(&matches).map_err(|e| ConfigError(e.into()))?;
        if let Some(path) = args.config.clone() {
            args.merge_file(&path, &matches).map_err(ConfigError)?;
        }
        args.validate().map_err(ConfigError)?;
        Ok(args)
    }

    fn merge_file(&mut self, path: &std::path::Path, m: &ArgMatches) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        let f: FileConfig =
            toml::from_str(&text).with_context(|| format!("config file {}", path.display()))?;
        // A value from the file applies only where neither a flag nor an environment variable gave one.
        let unset = |id: &str| {
            !matches!(
                m.value_source(id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            )
        };
        let dur = |v: &str, key: &str| {
            humantime::parse_duration(v).with_context(|| format!("config key {key}: {v:?}"))
        };
        if let (true, Some(v)) = (unset("node_id"), f.node_id) {
            self.node_id = v;
        }
        if let (true, Some(v)) = (unset("interval"), f.interval) {
            self.interval = dur(&v, "interval")?;
        }
        if let (true, Some(v)) = (unset("duration"), f.duration) {
            self.duration = Some(dur(&v, "duration")?);
        }
        if let (true, Some(v)) = (unset("sink"), f.sink) {
            self.sink = Some(v);
        }
        if let (true, Some(v)) = (unset("redis"), f.redis) {
            self.redis = Some(v);
        }
        if let (true, Some(v)) = (unset("redis_cluster"), f.redis_cluster) {
            self.redis_cluster = v;
        }
        if let (true, Some(v)) = (unset("redis_retention"), f.redis_retention) {
            self.redis_retention = dur(&v, "redis-retention")?;
        }
        if let (true, Some(v)) = (unset("redis_buffer"), f.redis_buffer) {
            self.redis_buffer = v;
        }
        if let (true, Some(v)) = (unset("metrics_addr"), f.metrics_addr) {
            self.metrics_addr = v;
        }
        if let (true, Some(v)) = (unset("ports"), f.ports) {
            self.ports = v;
        }
        if let (true, Some(v)) = (unset("cidrs"), f.cidrs) {
            self.cidrs = v;
        }
        if let (true, Some(v)) = (unset("uprobes"), f.uprobes) {
            self.uprobes = v.iter().map(|s| s.parse()).collect::<Result<_>>()?;
        }
        if let (true, Some(v)) = (unset("spans"), f.spans) {
            self.spans = v.iter().map(|s| s.parse()).collect::<Result<_>>()?;
        }
        if let (true, Some(v)) = (unset("netns"), f.netns) {
            self.netns = Some(v);
        }
        if let (true, Some(v)) = (unset("cgroup"), f.cgroup) {
            self.cgroup = Some(v);
        }
        if let (true, Some(v)) = (unset("btf"), f.btf) {
            self.btf = v;
        }
        Ok(())
    }

    fn validate(&self) -> Result<()> {
        self.filter()?;
        self.metrics_addr()?;
        self.redis_target()?;
        anyhow::ensure!(!self.interval.is_zero(), "--interval must be longer than 0");
        anyhow::ensure!(
            self.redis_buffer > 0,
            "--redis-buffer must hold at least one window"
        );
        anyhow::ensure!(
            self.uprobes.len() + self.spans.len() <= crate::capture::MAX_PROBES,
            "at most {} --uprobe and --span targets together",
            crate::capture::MAX_PROBES
        );
        Ok(())
    }
}
