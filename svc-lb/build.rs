use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

// Builds the eBPF object with the nightly toolchain and places it in OUT_DIR, from where
// the agent embeds it: the release binary is self-contained.
fn main() -> anyhow::Result<()> {
    let cargo_metadata::Metadata { packages, .. } = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = packages
        .into_iter()
        .find(|p| p.name.as_str() == "svc-lb-ebpf")
        .ok_or_else(|| anyhow!("svc-lb-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("svc-lb-ebpf manifest has no parent"))?
        .as_str()
        .to_owned();
    aya_build::build_ebpf(
        [Package {
            name: "svc-lb-ebpf",
            root_dir: &root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
