//! Socket backlog seen by the running agent inside a test-bed namespace: a server that stops
//! accepting shows its accept queue grow to the number of clients waiting.

use std::{
    net::{SocketAddr, SocketAddrV4, TcpListener},
    time::Duration,
};

use anyhow::{Context, Result};
use tokenflow_testbed::{SERVER_ADDR, Testbed, in_netns, traffic::connect_from};
use tokenflow_tests::{agent::Agent, privileged};

#[test]
fn accept_queue_grows_to_the_waiting_clients() -> Result<()> {
    let Some(_lock) = privileged("accept_queue_grows") else {
        return Ok(());
    };
    let bed = Testbed::create("blog")?;
    let addr = SocketAddr::V4(SocketAddrV4::new(SERVER_ADDR, 5207));
    // Bound and listening, never accepting.
    let _listener = in_netns(&bed.server, move || TcpListener::bind(addr).context("bind"))?;
    let netns = format!("/run/netns/{}", bed.server);
    let agent = Agent::start(&[
        "--interval",
        "500ms",
        "--netns",
        &netns,
        "--port",
        "5207",
        "--metrics-addr",
        "off",
    ])?;
    let mut clients = Vec::new();
    for waiting in [0usize, 3, 7] {
        while clients.len() < waiting {
            clients.push(connect_from(&bed.client, addr)?);
        }
        std::thread::sleep(Duration::from_millis(200));
        let seen = agent.windows().len();
        let w = agent.wait_windows(seen + 1, Duration::from_secs(5))?;
        let last = w.last().context("no window")?;
        let l = last
            .backlog
            .listeners
            .iter()
            .find(|l| l.port == 5207)
            .context("listener missing")?;
        eprintln!(
            "{waiting} clients waiting: accept queue {} of {}",
            l.accept_queue, l.accept_queue_limit
        );
        assert_eq!(l.accept_queue as usize, waiting);
        assert!(l.accept_queue_limit >= 7);
    }
    Ok(())
}
