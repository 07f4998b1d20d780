//! Entering a named network namespace from Rust: namespaces are per thread, so work runs on a thread
//! of its own that switches with setns(2) and never comes back.

use std::{fs::File, os::unix::fs::MetadataExt, thread};

use anyhow::{Context, Result, anyhow};
use nix::sched::{CloneFlags, setns};

fn ns_path(name: &str) -> String {
    format!("/run/netns/{name}")
}

/// Runs `f` on a fresh thread inside namespace `name` and returns its result.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let path = ns_path(name);
    let file = File::open(&path).with_context(|| format!("opening {path}"))?;
    thread::spawn(move || {
        setns(&file, CloneFlags::CLONE_NEWNET).context("setns into the namespace")?;
        drop(file);
        f()
    })
    .join()
    .map_err(|_| anyhow!("thread inside netns {name} panicked"))?
}

/// Inode number of the namespace (what the agent reports as `netns`).
pub fn netns_inode(name: &str) -> Result<u32> {
    let path = ns_path(name);
    let ino = std::fs::metadata(&path)
        .with_context(|| format!("stat {path}"))?
        .ino();
    u32::try_from(ino).context("netns inode does not fit u32")
}
