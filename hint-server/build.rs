//! Embeds the dashboard's charting library: Apache ECharts, vendored from the npm registry into
//! `ui/vendor/` by `cargo xtask setup` (pinned version, checked hash). Without it the build still
//! succeeds and `/ui` says how to get it, rather than failing every build of the hint server.
use std::path::PathBuf;

/// Never created: while the stub is embedded, watching it makes Cargo run this script on every
/// build (a watched path that does not exist is always stale), so the library is picked up
/// whenever it appears — even with a modification time older than this script's last run, which
/// watching the library itself would miss: a release build once kept the stub for hours after
/// the library was in place.
const UNTIL_VENDORED: &str = "ui/vendor/.not-vendored-yet";

fn main() -> std::io::Result<()> {
    let vendored = PathBuf::from("ui/vendor/echarts.min.js");
    println!("cargo:rerun-if-changed=ui/vendor");
    // The folder's time changes when the library is added or removed, not when `cargo xtask
    // setup` copies a new version over it: watch the file too.
    println!("cargo:rerun-if-changed={}", vendored.display());
    let out_dir = std::env::var("OUT_DIR").map_err(std::io::Error::other)?;
    let out = PathBuf::from(out_dir).join("echarts.min.js");
    let body = std::fs::read_to_string(&vendored).unwrap_or_else(|_| {
        println!("cargo:rerun-if-changed={UNTIL_VENDORED}");
        println!(
            "cargo:warning=ECharts is not vendored (hint-server/ui/vendor/echarts.min.js): run `cargo xtask setup`; /ui will say so"
        );
        "window.echartsMissing = 'the charting library is not vendored: run `cargo xtask setup` and rebuild';".into()
    });
    std::fs::write(out, body)
}
