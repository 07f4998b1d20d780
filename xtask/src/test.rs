//! `cargo xtask test`: everything CI runs, in order, stopping at the first failure.

use std::process::Command;

use anyhow::Result;

use crate::{
    setup::setup,
    util::{cargo, root, run, step},
};

/// Free disk a clean `cargo xtask test` needs under `target/` (measured on a clean clone: see
/// the README's "Tests" section); below it the build fails late with "No space left on device".
const DISK_NEEDED_GIB: f64 = 8.0;

pub fn test() -> Result<()> {
    setup()?;
    check_disk()?;
    step("test", "cargo fmt --check");
    run(full_cargo().args(["fmt", "--all", "--", "--check"]))?;
    step(
        "test",
        "cargo build --bins (the tests start them; the agent's build.rs compiles the eBPF programs)",
    );
    // xtask apart: its plotters has the ab_glyph font feature, and built together with the hint
    // server that feature would make the hint server's SVG plots need a registered font.
    // Only the binaries: `cargo test` builds the test targets, clippy checks every target, and
    // an `--all-targets` build here linked a second copy of each test binary.
    run(full_cargo().args(["build", "--workspace", "--exclude", "xtask", "--bins"]))?;
    step("test", "cargo clippy --workspace --all-targets -D warnings");
    run(full_cargo().args([
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
    run(full_cargo().args([
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
    run(full_cargo().args(["test", "-p", "xtask"]))?;
    fuzz_briefly()?;
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

/// Seconds each fuzz target runs in `cargo xtask test`: long enough to catch a shallow crash,
/// short enough for CI (a longer run: `cargo +nightly fuzz run <target>`).
const FUZZ_SECONDS: u32 = 30;

/// The parser fuzz targets (fuzz/): each starts from its committed seeds (recorded vLLM streams,
/// registration bodies) and runs for [`FUZZ_SECONDS`]; a crash fails the check and leaves its
/// input under fuzz/artifacts/.
fn fuzz_briefly() -> Result<()> {
    for target in ["sse_stream", "hint_json"] {
        step(
            "test",
            format!("cargo fuzz run {target} ({FUZZ_SECONDS} s, libFuzzer, nightly)"),
        );
        let corpus = root().join("fuzz/corpus").join(target);
        std::fs::create_dir_all(&corpus)?;
        run(Command::new("rustup")
            .current_dir(root())
            .args(["run", "nightly", "cargo", "fuzz", "run", target])
            .arg(&corpus)
            .arg(root().join("fuzz/seeds").join(target))
            .args(["--", &format!("-max_total_time={FUZZ_SECONDS}")])
            .arg("-print_final_stats=1"))?;
    }
    Ok(())
}

/// `cargo` for a full check, not an edit loop: incremental caches would add gigabytes on a clean
/// clone for no gain (`cargo test -p …` while editing keeps them).
fn full_cargo() -> Command {
    let mut c = cargo();
    c.env("CARGO_INCREMENTAL", "0");
    c
}

/// Fails early, saying how much is free, when a clean build would run out of disk.
fn check_disk() -> Result<()> {
    let target = root().join("target");
    let at = if target.exists() { target } else { root() };
    let st = nix::sys::statvfs::statvfs(&at)?;
    let free_gib = (st.blocks_available() as f64 * st.fragment_size() as f64) / (1u64 << 30) as f64;
    let built = at.join("debug").exists();
    if free_gib < DISK_NEEDED_GIB && !built {
        anyhow::bail!(
            "only {free_gib:.1} GiB free on {}; a clean test build needs about {DISK_NEEDED_GIB} GiB \
             (free some space, or point CARGO_TARGET_DIR at a larger disk)",
            at.display()
        );
    }
    step("test", format!("{free_gib:.1} GiB free for target/"));
    Ok(())
}
