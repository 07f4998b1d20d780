//! A three-host network on one machine: `client` — `router` — `server` network namespaces joined by
//! veth pairs, with addresses from the benchmarking range 198.18.0.0/15 and no route out. The router
//! can shape (tbf: a real bottleneck queue), drop (nftables `numgen random`) and delay (a TUN delay line,
//! since this kernel has neither netem nor fq). Dropping a [`Testbed`] removes everything it made.

mod delay;
mod netns;
pub mod traffic;

use std::{
    net::Ipv4Addr,
    process::{Command, Output},
    time::Duration,
};

use anyhow::{Context, Result, bail};

pub use delay::DelayLine;
pub use netns::{in_netns, netns_inode};

/// Client host address (client side of the client—router link).
pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
pub const ROUTER_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// Server host address (server side of the router—server link).
pub const SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
pub const ROUTER_SERVER_ADDR: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
/// A second server address (same host): lets a run tell one client's flows from another's by the
/// remote address alone.
pub const SERVER_ADDR_2: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 3);
/// The management link between the host and the client namespace (control traffic: hints), which
/// bypasses the router and so never queues behind the bottleneck.
pub const MGMT_HOST_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
pub const MGMT_CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 2);
/// Prefix of every namespace a test bed creates; `cleanup_stale` removes leftovers by it.
pub const NS_PREFIX: &str = "tf-";
/// Router interface towards the client and towards the server.
pub const ROUTER_TO_CLIENT: &str = "to-client";
pub const ROUTER_TO_SERVER: &str = "to-server";

/// Runs a command and fails with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| {
        format!("spawning {cmd:?} (is iproute2/nftables installed? run `cargo xtask setup`)")
    })?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

fn ip(args: &[&str]) -> Result<Output> {
    run(Command::new("ip").args(args))
}

pub struct Testbed {
    pub client: String,
    pub router: String,
    pub server: String,
    delay: Option<DelayLine>,
}

impl Testbed {
    /// Creates the three namespaces, links and routes. `tag` keeps names unique per user (≤ 8 chars).
    pub fn create(tag: &str) -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the network-namespace test bed needs root (ip netns, tc, nft)");
        }
        let id = format!("{NS_PREFIX}{tag}-{}", std::process::id());
        let bed = Testbed {
            client: format!("{id}-c"),
            router: format!("{id}-r"),
            server: format!("{id}-s"),
            delay: None,
        };
        // From here on Drop cleans up whatever was made, also when a step fails.
        for ns in [&bed.client, &bed.router, &bed.server] {
            ip(&["netns", "add", ns])?;
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
        }
        bed.link(
            &bed.client,
            ROUTER_TO_CLIENT,
            CLIENT_ADDR,
            ROUTER_CLIENT_ADDR,
        )?;
        bed.link(
            &bed.server,
            ROUTER_TO_SERVER,
            SERVER_ADDR,
            ROUTER_SERVER_ADDR,
        )?;
        ip(&[
            "-n",
            &bed.client,
            "route",
            "add",
            "198.18.2.0/24",
            "via",
            &ROUTER_CLIENT_ADDR.to_string(),
        ])?;
        ip(&[
            "-n",
            &bed.server,
            "route",
            "add",
            "198.18.1.0/24",
            "via",
            &ROUTER_SERVER_ADDR.to_string(),
        ])?;
        bed.sysctl(&bed.router, "net.ipv4.ip_forward", "1")?;
        for ns in [&bed.client, &bed.server] {
            // Tests compare against the kernel's own counters: keep TCP's defaults simple and explicit.
            bed.sysctl(ns, "net.ipv4.tcp_no_metrics_save", "1")?;
        }
        Ok(bed)
    }

    /// veth pair: `eth0` in `host` with `addr`, `router_if` in the router with `router_addr`.
    fn link(
        &self,
        host: &str,
        router_if: &str,
        addr: Ipv4Addr,
        router_addr: Ipv4Addr,
    ) -> Result<()> {
        ip(&[
            "link",
            "add",
            router_if,
            "netns",
            &self.router,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            host,
        ])?;
        ip(&[
            "-n",
            host,
            "addr",
            "add",
            &format!("{addr}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&[
            "-n",
            &self.router,
            "addr",
            "add",
            &format!("{router_addr}/24"),
            "dev",
            router_if,
        ])?;
        ip(&["-n", host, "link", "set", "eth0", "up"])?;
        ip(&["-n", &self.router, "link", "set", router_if, "up"])?;
        // veth offloads make 64 KB "packets" that tbf cannot shape faithfully.
        for (ns, dev) in [(host, "eth0"), (self.router.as_str(), router_if)] {
            run(Command::new("ip").args([
                "netns", "exec", ns, "ethtool", "-K", dev, "tso", "off", "gso", "off", "gro", "off",
            ]))?;
        }
        Ok(())
    }

    /// A veth pair from the host (`MGMT_HOST_ADDR`) to the client namespace (`MGMT_CLIENT_ADDR`):
    /// how a client reaches services on the host, as a node reaches its control plane. One per
    /// process; removed with the client namespace.
    pub fn add_management_link(&self) -> Result<()> {
        let host_if = format!("tfm{}", std::process::id());
        ip(&[
            "link",
            "add",
            &host_if,
            "type",
            "veth",
            "peer",
            "name",
            "mgmt0",
            "netns",
            &self.client,
        ])?;
        ip(&[
            "addr",
            "add",
            &format!("{MGMT_HOST_ADDR}/30"),
            "dev",
            &host_if,
        ])?;
        ip(&["link", "set", &host_if, "up"])?;
        ip(&[
            "-n",
            &self.client,
            "addr",
            "add",
            &format!("{MGMT_CLIENT_ADDR}/30"),
            "dev",
            "mgmt0",
        ])?;
        ip(&["-n", &self.client, "link", "set", "mgmt0", "up"])?;
        Ok(())
    }

    /// Gives the server a second address, `SERVER_ADDR_2`.
    pub fn add_server_addr_2(&self) -> Result<()> {
        ip(&[
            "-n",
            &self.server,
            "addr",
            "add",
            &format!("{SERVER_ADDR_2}/24"),
            "dev",
            "eth0",
        ])
        .map(|_| ())
    }

    pub fn sysctl(&self, ns: &str, key: &str, value: &str) -> Result<()> {
        run(self
            .exec(ns, "sysctl")
            .args(["-q", "-w", &format!("{key}={value}")]))
        .map(|_| ())
    }

    /// A command that runs inside namespace `ns`.
    pub fn exec(&self, ns: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns, program]);
        c
    }

    /// A real bottleneck: tbf at `rate_kbit` with a `buffer` of queueing, on the router's egress in
    /// both directions.
    pub fn set_bottleneck(&self, rate_kbit: u64, buffer: Duration) -> Result<()> {
        for dev in [ROUTER_TO_SERVER, ROUTER_TO_CLIENT] {
            run(self.exec(&self.router, "tc").args([
                "qdisc",
                "replace",
                "dev",
                dev,
                "root",
                "tbf",
                "rate",
                &format!("{rate_kbit}kbit"),
                "burst",
                "16kb",
                "latency",
                &format!("{}ms", buffer.as_millis()),
            ]))?;
        }
        Ok(())
    }

    pub fn clear_bottleneck(&self) -> Result<()> {
        for dev in [ROUTER_TO_SERVER, ROUTER_TO_CLIENT] {
            let _ = run(self
                .exec(&self.router, "tc")
                .args(["qdisc", "del", "dev", dev, "root"]));
        }
        Ok(())
    }

    /// Drops `per_mille`/1000 of the client→server packets of TCP port `dport` in the router (nftables
    /// `numgen random`; 1000 or more: every one): real losses, so real retransmits.
    pub fn set_loss(&self, per_mille: u32, dport: u16) -> Result<()> {
        let random = if per_mille >= 1000 {
            String::new()
        } else {
            format!("numgen random mod 1000 < {per_mille} ")
        };
        let rules = format!(
            "table inet tokenflow_loss {{\n chain forward_loss {{\n  type filter hook forward priority 0; policy accept;\n  \
             ip saddr 198.18.1.0/24 tcp dport {dport} {random}counter drop\n }}\n}}\n"
        );
        let _ =
            run(self
                .exec(&self.router, "nft")
                .args(["delete", "table", "inet", "tokenflow_loss"]));
        let path = std::env::temp_dir().join(format!("{}-loss.nft", self.router));
        std::fs::write(&path, rules).context("writing the nft rules file")?;
        let r = run(self.exec(&self.router, "nft").arg("-f").arg(&path));
        let _ = std::fs::remove_file(&path);
        r.map(|_| ())
    }

    pub fn clear_loss(&self) -> Result<()> {
        run(self
            .exec(&self.router, "nft")
            .args(["delete", "table", "inet", "tokenflow_loss"]))
        .map(|_| ())
    }

    /// Adds a fixed one-way delay to every client→server packet (a TUN delay line in the router);
    /// with a line already there, changes its delay for the packets that enter from now on.
    pub fn set_delay(&mut self, one_way: Duration) -> Result<()> {
        match &self.delay {
            Some(line) => line.set(one_way),
            None => self.delay = Some(DelayLine::start(&self.router, one_way)?),
        }
        Ok(())
    }

    pub fn clear_delay(&mut self) {
        self.delay = None;
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        self.delay = None;
        for ns in [&self.client, &self.router, &self.server] {
            let _ = ip(&["netns", "del", ns]);
        }
    }
}

/// Namespaces left by a test bed whose process is gone (a killed test, a Ctrl-C'd demo).
pub fn cleanup_stale() -> Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    let mut removed = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix(NS_PREFIX) else {
            continue;
        };
        let pid = rest.split('-').nth(1).and_then(|p| p.parse::<i32>().ok());
        let alive = pid.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists());
        if !alive {
            ip(&["netns", "del", name])?;
            removed.push(name.to_string());
        }
    }
    Ok(removed)
}

/// Namespaces that exist now with the test-bed prefix.
pub fn testbed_namespaces() -> Result<Vec<String>> {
    let out = ip(&["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(NS_PREFIX))
        .map(str::to_string)
        .collect())
}
