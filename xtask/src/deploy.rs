//! `cargo xtask check-deploy`: validates what operators deploy — docker-compose.yml (with and
//! without the GPU override) by docker-compose's own schema check, the Kubernetes manifests by
//! their OpenAPI schemas (kubernetes-validate, strict: unknown fields fail), the kustomization
//! against the folder, and the Grafana boards' JSON shape. That every metric a board queries is
//! exported by some component is checked by `tests/tests/dashboards.rs`, against live endpoints.

use std::{collections::BTreeSet, path::Path, process::Command};

use anyhow::{Context, Result, bail, ensure};

use crate::{
    setup::{KUBERNETES_VERSION, kubernetes_validate},
    util::{root, run, step},
};

pub fn check() -> Result<()> {
    compose()?;
    kubernetes()?;
    grafana()?;
    step("deploy", "compose, Kubernetes and Grafana files are valid");
    Ok(())
}

fn compose() -> Result<()> {
    for files in [
        &["docker-compose.yml"][..],
        &["docker-compose.yml", "deploy/compose.gpu.yml"],
    ] {
        step(
            "deploy",
            format!("docker-compose config: {}", files.join(" + ")),
        );
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(root());
        for f in files {
            cmd.args(["-f", f]);
        }
        run(cmd.args(["config", "--quiet"]))?;
    }
    Ok(())
}

fn kubernetes() -> Result<()> {
    let dir = root().join("deploy/k8s");
    let mut manifests = BTreeSet::new();
    for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".yaml") && name != "kustomization.yaml" {
            manifests.insert(name);
        }
    }
    let kustomization: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml"))?)
            .context("parsing deploy/k8s/kustomization.yaml")?;
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .context("kustomization.yaml has no resources list")?
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    ensure!(
        listed == manifests,
        "deploy/k8s/kustomization.yaml lists {listed:?} but the folder holds {manifests:?}"
    );
    step(
        "deploy",
        format!(
            "kubernetes-validate --strict (Kubernetes {KUBERNETES_VERSION}): {} manifests",
            manifests.len()
        ),
    );
    run(Command::new(kubernetes_validate())
        .current_dir(&dir)
        .args(["--strict", "--no-warn", "-k", KUBERNETES_VERSION])
        .args(&manifests))
}

/// Every board parses, has a unique uid, and every panel queries Prometheus.
fn grafana() -> Result<()> {
    let dir = root().join("dashboards");
    let mut uids = BTreeSet::new();
    let mut boards = 0;
    for e in std::fs::read_dir(&dir)? {
        let path = e?.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let board: serde_json::Value = serde_json::from_slice(&std::fs::read(&path)?)
            .with_context(|| format!("parsing {}", path.display()))?;
        let name = path.file_name().map(Path::new).unwrap_or(&path).display();
        let uid = board["uid"].as_str().unwrap_or_default().to_string();
        ensure!(!uid.is_empty(), "{name}: no uid");
        ensure!(uids.insert(uid.clone()), "{name}: uid {uid} used twice");
        let panels = board["panels"].as_array().map_or(&[][..], Vec::as_slice);
        ensure!(!panels.is_empty(), "{name}: no panels");
        for p in panels {
            let title = p["title"].as_str().unwrap_or("?");
            let targets = p["targets"].as_array().map_or(&[][..], Vec::as_slice);
            if targets.is_empty()
                || targets
                    .iter()
                    .any(|t| t["expr"].as_str().is_none_or(str::is_empty))
            {
                bail!("{name}: panel {title:?} has a target without a PromQL expression");
            }
        }
        boards += 1;
    }
    ensure!(
        boards >= 4,
        "expected the agent, hint server, backend and pacer boards, found {boards}"
    );
    step(
        "deploy",
        format!("Grafana: {boards} boards parse, every panel queries Prometheus"),
    );
    Ok(())
}
