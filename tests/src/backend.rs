//! `tokenflow-backend` as a real subprocess on loopback, serving the tiny random-weight model.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result};

use crate::{ChildGuard, agent::sibling_binary};

/// Writes the tiny model into `dir/model` and returns its path.
pub fn tiny_model(dir: &Path) -> Result<PathBuf> {
    let model = dir.join("model");
    let st = Command::new(sibling_binary("tokenflow-backend")?)
        .args(["init-model", "--size", "tiny", "--out"])
        .arg(&model)
        .stderr(Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "init-model failed");
    Ok(model)
}

/// `tokenflow-backend serve` on `listen` with `extra` arguments, killed when dropped.
pub fn serve(model: &Path, listen: SocketAddr, extra: &[&str]) -> Result<ChildGuard> {
    Ok(ChildGuard(
        Command::new(sibling_binary("tokenflow-backend")?)
            .arg("serve")
            .arg("--model")
            .arg(model)
            .args(["--listen", &listen.to_string()])
            .args(extra)
            .stderr(Stdio::null())
            .spawn()?,
    ))
}

/// Waits for the backend at `addr` to answer `/health` (model loaded), and returns the id of the
/// model it serves.
pub fn ready_model(addr: SocketAddr) -> Result<String> {
    crate::hint_server::wait_http(addr, "/health", std::time::Duration::from_secs(30))?;
    let (_, models) = crate::hint_server::http(addr, "GET", "/v1/models", None, None)?;
    let models: serde_json::Value = serde_json::from_str(&models)?;
    Ok(models["data"][0]["id"]
        .as_str()
        .context("the backend lists no model")?
        .to_string())
}
