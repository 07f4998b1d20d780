//! Command line of `tokenflow-agent`, with environment-variable fallbacks for every flag.

use std::{os::unix::fs::MetadataExt, path::PathBuf, time::Duration};

use anyhow::{Context, Result};
use clap::{Parser, ValueEnum};

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

    /// Write windows to this Redis (stream `tokenflow:telemetry:<node-id>`, key `tokenflow:latest:<node-id>`).
    #[arg(long, env = "TOKENFLOW_REDIS")]
    pub redis: Option<String>,

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

    /// Watch only sockets in this network namespace: a path (/run/netns/NAME, /proc/PID/ns/net) or an inode number.
    #[arg(long, env = "TOKENFLOW_NETNS")]
    pub netns: Option<String>,

    /// Watch only sockets of this cgroup: a cgroup v2 directory (/sys/fs/cgroup/...) or a cgroup id.
    #[arg(long, env = "TOKENFLOW_CGROUP")]
    pub cgroup: Option<String>,

    /// Kernel BTF used to locate struct fields (netns, cgroup, segment counts).
    #[arg(long, env = "TOKENFLOW_BTF", default_value = crate::btf_offsets::VMLINUX_BTF)]
    pub btf: PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
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
    fn bad_interval_is_rejected() {
        assert!(Args::try_parse_from(["x", "--interval", "soon"]).is_err());
    }
}
