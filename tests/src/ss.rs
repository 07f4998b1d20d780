//! The kernel's own view of a socket, through `ss -tin` run inside a namespace: the oracle the
//! agent's figures are checked against.

use std::process::Command;

use anyhow::{Context, Result};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SsInfo {
    pub local_port: u16,
    /// Smoothed RTT, milliseconds (`rtt:<srtt>/<rttvar>`).
    pub rtt_ms: f64,
    /// `tp->total_retrans` (the second number of `retrans:<now>/<total>`; 0 when absent).
    pub total_retrans: u64,
}

/// Established TCP sockets in namespace `ns` whose peer is `peer` (an address or addr:port).
pub fn sockets(ns: &str, peer: &str) -> Result<Vec<SsInfo>> {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "ss",
            "-tinH",
            "state",
            "established",
            "dst",
            peer,
        ])
        .output()
        .context("running ss")?;
    anyhow::ensure!(
        out.status.success(),
        "ss failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&String::from_utf8_lossy(&out.stdout))
}

/// Parses `ss -tinH` output: a socket line, then an indented detail line.
pub fn parse(text: &str) -> Result<Vec<SsInfo>> {
    let mut res = Vec::new();
    let mut port = None;
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            // "0 0 198.18.1.2:45678 198.18.2.2:5201" (with -H there is no header; state column omitted by filter)
            let local = line
                .split_whitespace()
                .nth(2)
                .context("ss socket line without a local address")?;
            port = local.rsplit(':').next().and_then(|p| p.parse().ok());
            continue;
        }
        let Some(local_port) = port.take() else {
            continue;
        };
        let mut info = SsInfo {
            local_port,
            rtt_ms: 0.0,
            total_retrans: 0,
        };
        for tok in line.split_whitespace() {
            if let Some(v) = tok.strip_prefix("rtt:") {
                info.rtt_ms = v
                    .split('/')
                    .next()
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0.0);
            } else if let Some(v) = tok.strip_prefix("retrans:") {
                info.total_retrans = v
                    .split('/')
                    .nth(1)
                    .and_then(|x| x.parse().ok())
                    .unwrap_or(0);
            }
        }
        res.push(info);
    }
    Ok(res)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rtt_and_total_retrans() {
        let text = "0      0      198.18.1.2:40312 198.18.2.2:5201\n\t cubic wscale:7,7 rto:228 rtt:20.512/0.25 ato:40 mss:1448 cwnd:10 retrans:0/17 send 5.6Mbps\n";
        let s = parse(text).unwrap();
        assert_eq!(
            s,
            vec![SsInfo {
                local_port: 40312,
                rtt_ms: 20.512,
                total_retrans: 17
            }]
        );
    }

    #[test]
    fn no_retrans_field_means_zero() {
        let text = "0 0 198.18.1.2:1 198.18.2.2:2\n\t rtt:1.5/0.5\n";
        assert_eq!(parse(text).unwrap()[0].total_retrans, 0);
    }
}
