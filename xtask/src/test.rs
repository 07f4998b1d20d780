//! `cargo xtask test`: everything CI runs, in order, stopping at the first failure.

use std::process::Command;

use anyhow::Result;

use crate::{
    setup::setup,
    util::{cargo, root, run, step},
};

pub fn test() -> Result<()> {
    setup()?;
    step("test", "cargo fmt --check");
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    step(
        "test",
        "cargo build (host crates; the agent's build.rs compiles the eBPF programs)",
    );
    // xtask apart: its plotters has the ab_glyph font feature, and built together with the hint
    // server that feature would make the hint server's SVG plots need a registered font.
    run(cargo().args([
        "build",
        "--workspace",
        "--exclude",
        "xtask",
        "--all-targets",
    ]))?;
    step("test", "cargo clippy --workspace --all-targets -D warnings");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("test", "cargo clippy on the kernel programs (bpfel target)");
    // Through rustup: the eBPF crate needs nightly for -Z build-std, as in the agent's build.rs.
    run(Command::new("rustup")
        .current_dir(root())
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "-p",
            "agent-ebpf",
            "--release",
        ])
        .args(["--target", "bpfel-unknown-none", "-Z", "build-std=core"])
        .args(["--target-dir", "target/ebpf-clippy", "--", "-D", "warnings"]))?;
    step(
        "test",
        "cargo test (privileged tests run as root; under CI=true they may not skip)",
    );
    run(cargo().args([
        "test",
        "--workspace",
        "--exclude",
        "xtask",
        "--no-fail-fast",
    ]))?;
    step(
        "test",
        "cargo test -p xtask (on its own, see the build step)",
    );
    run(cargo().args(["test", "-p", "xtask"]))?;
    step(
        "test",
        "deployment files: docker-compose config, kubernetes-validate, Grafana boards",
    );
    crate::deploy::check()?;
    step(
        "test",
        "the quick A/B demo as an integration test: the loop works, every arm completes, nothing is left behind",
    );
    if crate::util::is_root() {
        crate::demo::demo(&crate::demo::DemoArgs::quick_check())?;
    } else if std::env::var("CI").is_ok_and(|v| v == "true") {
        anyhow::bail!("CI=true but not root: the demo check needs root (namespaces, eBPF)");
    } else {
        step(
            "test",
            "SKIPPED the demo check: it needs root (run `sudo cargo xtask test`)",
        );
    }
    step("test", "all checks passed");
    Ok(())
}
