//! `cargo xtask setup`: installs what TokenFlow needs on a fresh Debian machine, idempotently, one line
//! per step. Fast when everything is present: each step first checks, then acts only if needed.

use std::{path::Path, process::Command};

use anyhow::{Context, Result, bail};

use crate::util::{is_root, output, run, step, succeeds};

/// Debian packages: the LLVM that bpf-linker links against, and the tools the test bed, tests and
/// benchmarks call (tc/ip/ss, nft, bpftool, ethtool, redis-server, redis-cli for a local Redis Cluster, bpftrace as the bench baseline,
/// protoc for the gRPC test server, a font for the demo's plots, docker-compose and a Python venv
/// for validating the deployment files, Chromium and chromedriver for the dashboard's browser test).
pub const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "bpftool",
    "nftables",
    "iproute2",
    "ethtool",
    "redis-server",
    "redis-tools",
    "bpftrace",
    "protobuf-compiler",
    "wrk",
    "fonts-dejavu-core",
    "docker-compose",
    "python3-venv",
    "chromium",
    "chromium-driver",
];

/// Kubernetes version the manifests are validated against.
pub const KUBERNETES_VERSION: &str = "1.31.0";
/// kubernetes-validate (PyPI: the Kubernetes OpenAPI schemas of every release, bundled), pinned.
const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";
/// OpenAI's own Python SDK, pinned: a test streams from the backend with it.
const OPENAI_SDK: &str = "openai==3.54.0";

pub fn setup() -> Result<()> {
    packages()?;
    rust_components()?;
    bpf_linker()?;
    cargo_fuzz()?;
    python_tools()?;
    ui_vendor()?;
    kernel_filesystems()?;
    kernel_btf()?;
    step("setup", "ready");
    Ok(())
}

fn installed(pkg: &str) -> bool {
    output(Command::new("dpkg-query").args(["-W", "-f=${Status}", pkg]))
        .is_ok_and(|s| s.contains("install ok installed"))
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES.iter().copied().filter(|p| !installed(p)).collect();
    if missing.is_empty() {
        step(
            "setup",
            format!("Debian packages: all {} present", PACKAGES.len()),
        );
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {missing:?}: run `sudo cargo xtask setup` (or apt-get install them)"
        );
    }
    step(
        "setup",
        format!("Debian packages: installing {}", missing.join(" ")),
    );
    run(Command::new("apt-get").args(["update", "-q"]))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))
}

fn rust_components() -> Result<()> {
    let nightly = output(Command::new("rustup").args(["component", "list", "--toolchain", "nightly", "--installed"]))
        .context("the nightly toolchain is needed to build the eBPF programs (rustup toolchain install nightly)")?;
    if nightly.lines().any(|l| l.starts_with("rust-src")) {
        step("setup", "rust-src (nightly): present");
    } else {
        step("setup", "rust-src (nightly): installing");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    let stable = output(Command::new("rustup").args(["component", "list", "--installed"]))?;
    for comp in ["clippy", "rustfmt"] {
        if !stable.lines().any(|l| l.starts_with(comp)) {
            step("setup", format!("{comp}: installing"));
            run(Command::new("rustup").args(["component", "add", comp]))?;
        }
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if succeeds(Command::new("bpf-linker").arg("--version")) {
        step("setup", "bpf-linker: present");
        return Ok(());
    }
    step(
        "setup",
        "bpf-linker: building against llvm-22 (1-3 minutes)",
    );
    // A plain `cargo install bpf-linker` wants LLVM 23, which this distribution does not have.
    run(Command::new("cargo")
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .args([
            "install",
            "bpf-linker",
            "--version",
            "0.13.0",
            "--no-default-features",
            "--features",
            "llvm-22",
        ]))
}

/// cargo-fuzz, for the parser fuzz targets `cargo xtask test` runs briefly (libFuzzer, nightly).
fn cargo_fuzz() -> Result<()> {
    if succeeds(Command::new("cargo").args(["fuzz", "--version"])) {
        step("setup", "cargo-fuzz: present");
        return Ok(());
    }
    step("setup", "cargo-fuzz: installing (about 2 minutes)");
    run(Command::new("cargo").args(["install", "cargo-fuzz", "--version", "0.13.2", "--locked"]))
}

/// The virtual environment holding the Python validators (under target/, so a clean clone
/// starts without it and `cargo clean` removes it).
fn tools_venv() -> std::path::PathBuf {
    crate::util::root().join("target/tools/venv")
}

/// kubernetes-validate, as installed by `setup`.
pub fn kubernetes_validate() -> std::path::PathBuf {
    tools_venv().join("bin/kubernetes-validate")
}

fn python_tools() -> Result<()> {
    let venv = tools_venv();
    let sdk = OPENAI_SDK.trim_start_matches("openai==");
    let sdk_present = output(
        Command::new(venv.join("bin/python"))
            .args(["-c", "import openai; print(openai.__version__)"]),
    )
    .is_ok_and(|v| v.trim() == sdk);
    if succeeds(Command::new(kubernetes_validate()).arg("--version")) && sdk_present {
        step("setup", "kubernetes-validate, OpenAI Python SDK: present");
        return Ok(());
    }
    step(
        "setup",
        format!(
            "{KUBERNETES_VALIDATE}, {OPENAI_SDK}: installing into {}",
            venv.display()
        ),
    );
    if !venv.join("bin/pip").exists() {
        run(Command::new("python3").arg("-m").arg("venv").arg(&venv))
            .context("creating a Python virtual environment (apt-get install python3-venv)")?;
    }
    run(Command::new(venv.join("bin/pip")).args([
        "install",
        "--quiet",
        KUBERNETES_VALIDATE,
        OPENAI_SDK,
    ]))
}

/// Apache ECharts for the hint server's dashboard, from the npm registry: pinned version, tarball
/// checked against its SHA-256 before anything is extracted.
const ECHARTS_VERSION: &str = "6.1.0";
const ECHARTS_SHA256: &str = "681aff88cc1038c3fa941a3a53d1b177a52250b05335efc607d6105ae13be481";

fn ui_vendor() -> Result<()> {
    let root = crate::util::root();
    let dest = root.join("hint-server/ui/vendor/echarts.min.js");
    let stamp = root.join("hint-server/ui/vendor/VERSION");
    if dest.exists() && std::fs::read_to_string(&stamp).is_ok_and(|v| v.trim() == ECHARTS_VERSION) {
        step(
            "setup",
            format!("ECharts {ECHARTS_VERSION} (dashboard): vendored"),
        );
        return Ok(());
    }
    step(
        "setup",
        format!("ECharts {ECHARTS_VERSION} (dashboard): fetching from the npm registry"),
    );
    let tools = root.join("target/tools");
    std::fs::create_dir_all(&tools)?;
    let tgz = tools.join(format!("echarts-{ECHARTS_VERSION}.tgz"));
    run(Command::new("curl")
        .args(["-fsSL", "--retry", "3", "-o"])
        .arg(&tgz)
        .arg(format!(
            "https://registry.npmjs.org/echarts/-/echarts-{ECHARTS_VERSION}.tgz"
        )))
    .context("downloading ECharts from registry.npmjs.org")?;
    let sum = output(Command::new("sha256sum").arg(&tgz))?;
    if sum.split_whitespace().next() != Some(ECHARTS_SHA256) {
        let _ = std::fs::remove_file(&tgz);
        bail!("echarts-{ECHARTS_VERSION}.tgz: SHA-256 {sum} is not the pinned {ECHARTS_SHA256}");
    }
    let dir = dest.parent().context("vendor folder")?;
    std::fs::create_dir_all(dir)?;
    run(Command::new("tar")
        .arg("-xzf")
        .arg(&tgz)
        .arg("-C")
        .arg(&tools)
        .arg("package/dist/echarts.min.js"))?;
    std::fs::copy(tools.join("package/dist/echarts.min.js"), &dest)?;
    std::fs::write(&stamp, ECHARTS_VERSION)?;
    Ok(())
}

fn kernel_filesystems() -> Result<()> {
    for (fs, dir, probe) in [
        (
            "tracefs",
            "/sys/kernel/tracing",
            "/sys/kernel/tracing/events",
        ),
        ("bpf", "/sys/fs/bpf", ""),
    ] {
        let mounted = if probe.is_empty() {
            output(Command::new("findmnt").args(["-n", "-t", fs, dir]))
                .is_ok_and(|s| !s.trim().is_empty())
        } else {
            Path::new(probe).exists()
        };
        if mounted {
            step("setup", format!("{fs} at {dir}: mounted"));
            continue;
        }
        if !is_root() {
            bail!("{fs} is not mounted at {dir}: run `sudo cargo xtask setup`");
        }
        step("setup", format!("{fs} at {dir}: mounting"));
        run(Command::new("mount").args(["-t", fs, fs, dir]))?;
    }
    Ok(())
}

/// The agent reads socket fields at offsets from the kernel's BTF and refuses to start without
/// it; the tests and the demo start the agent, so a machine without BTF is told here, first.
/// `TOKENFLOW_BTF` (the agent's `--btf`, inherited by the agents the tests and demo start) points
/// at a vmlinux BTF file where the kernel does not expose one.
fn kernel_btf() -> Result<()> {
    let (path, from_env) = match std::env::var_os("TOKENFLOW_BTF") {
        Some(p) => (std::path::PathBuf::from(p), true),
        None => (std::path::PathBuf::from("/sys/kernel/btf/vmlinux"), false),
    };
    if path.is_file() {
        step(
            "setup",
            format!("kernel BTF at {}: present", path.display()),
        );
        return Ok(());
    }
    if from_env {
        bail!(
            "TOKENFLOW_BTF={} is not a file: point it at this kernel's vmlinux BTF",
            path.display()
        );
    }
    bail!(
        "this kernel exposes no BTF at {}: the agent needs it (a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y, as Debian's and Ubuntu's are), or set TOKENFLOW_BTF to a vmlinux \
         BTF file for this kernel (e.g. from btfhub)",
        path.display()
    )
}
