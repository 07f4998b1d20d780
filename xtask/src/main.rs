//! `cargo xtask`: the one entry point for TokenFlow's chores — set-up, the demo, tests, benchmarks.

mod bench;
mod bench_hint;
mod bench_llm;
mod demo;
mod deploy;
mod record;
mod report;
mod setup;
mod test;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// TokenFlow developer and operator tasks. Each command installs what it needs first.
#[derive(Parser)]
#[command(name = "cargo xtask", version, about)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install prerequisites (Debian packages, rust-src, bpf-linker, tracefs/bpffs); idempotent.
    Setup,
    /// Run the main job on the network-namespace test bed (see `cargo xtask demo --help`).
    Demo(demo::DemoArgs),
    /// Validate docker-compose.yml, the Kubernetes manifests and the Grafana boards.
    CheckDeploy,
    /// Everything CI runs: fmt, build, clippy (host and eBPF), unit and privileged integration tests.
    Test,
    /// Measure the capture's cost and write benchmarks/results.json (see `cargo xtask bench --help`).
    Bench(bench::BenchArgs),
    /// Record labelled agent windows from the test bed under changing load, bandwidth and loss
    /// (training data for the hint server's models; see `cargo xtask record-trace --help`).
    RecordTrace(record::RecordArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.cmd {
        Cmd::Setup => setup::setup(),
        Cmd::Demo(a) => demo::demo(&a),
        Cmd::Test => test::test(),
        Cmd::CheckDeploy => setup::setup().and_then(|()| deploy::check()),
        Cmd::Bench(a) => bench::bench(&a),
        Cmd::RecordTrace(a) => record::record(&a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
