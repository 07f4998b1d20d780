//! Builds `agent-ebpf` for the BPF target with aya-build; the agent embeds the object.
fn main() -> anyhow::Result<()> {
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "agent-ebpf",
            root_dir: "../agent-ebpf",
            ..Default::default()
        }],
        aya_build::Toolchain::Custom("nightly"),
    )
}
