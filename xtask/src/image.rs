//! `cargo xtask image`: the agent's container image, built without a container engine
//! and without pulling anything. A statically linked release binary is the image's only
//! file (`FROM scratch`); the OCI layout (blobs, manifest, index) is written here and
//! packed as an OCI archive that `podman load`, `ctr images import` and
//! `kind load image-archive` read.
//!
//! The image's name, tag, entrypoint and arguments come from deploy/daemonset.yaml, so
//! the image and the DaemonSet cannot disagree; the tag must be the workspace version.

use std::{
    collections::BTreeMap,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::Args;
use flate2::{Compression, write::GzEncoder};
use oci_spec::image::{
    ANNOTATION_CREATED, ANNOTATION_DESCRIPTION, ANNOTATION_LICENSES, ANNOTATION_REF_NAME,
    ANNOTATION_REVISION, ANNOTATION_SOURCE, ANNOTATION_TITLE, ANNOTATION_VERSION, Arch,
    ConfigBuilder, Descriptor, DescriptorBuilder, Digest, HistoryBuilder,
    ImageConfigurationBuilder, ImageIndexBuilder, ImageManifestBuilder, MediaType, Os,
    PlatformBuilder, RootFsBuilder,
};
use serde::Serialize;
use sha2::{Digest as _, Sha256};

use crate::{
    Ctx,
    process::{note, output, run, step},
};

/// The workspace version: the image tag, and the `version` label.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The `source` label (the workspace's `repository`).
const SOURCE: &str = env!("CARGO_PKG_REPOSITORY");
const LICENSE: &str = env!("CARGO_PKG_LICENSE");
/// containerd names an imported image after this annotation (`ctr images import`, which
/// `kind load image-archive` runs); without it, it invents an `import-<date>` name.
const CONTAINERD_IMAGE_NAME: &str = "io.containerd.image.name";
/// The DaemonSet container that runs the agent.
const AGENT_CONTAINER: &str = "agent";

#[derive(Args)]
pub struct ImageArgs {
    /// Write the OCI archive here instead of target/image/svc-lb-<version>.oci.tar.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

/// What deploy/daemonset.yaml says about the image.
#[derive(Debug, PartialEq)]
pub struct ImageSpec {
    /// `svc-lb:0.1.0` as the DaemonSet writes it.
    pub reference: String,
    /// The same, fully qualified (`docker.io/library/svc-lb:0.1.0`), as the container
    /// runtimes on the nodes resolve it.
    pub full_reference: String,
    pub tag: String,
    /// The container's `command`: the image's entrypoint. Its first word is where the
    /// binary goes in the image.
    pub entrypoint: Vec<String>,
    /// The container's `args`: the image's default arguments.
    pub cmd: Vec<String>,
}

impl ImageSpec {
    /// Reads the agent container of the DaemonSet in `daemonset_yaml`.
    pub fn from_daemonset(daemonset_yaml: &str) -> Result<Self> {
        let ds: serde_yaml::Value =
            serde_yaml::from_str(daemonset_yaml).context("deploy/daemonset.yaml is not YAML")?;
        let containers = ds["spec"]["template"]["spec"]["containers"]
            .as_sequence()
            .context("deploy/daemonset.yaml: no spec.template.spec.containers")?;
        let agent = containers
            .iter()
            .find(|c| c["name"].as_str() == Some(AGENT_CONTAINER))
            .with_context(|| format!("deploy/daemonset.yaml: no container {AGENT_CONTAINER:?}"))?;
        let strings = |key: &str| -> Result<Vec<String>> {
            agent[key]
                .as_sequence()
                .with_context(|| format!("deploy/daemonset.yaml: the agent has no {key}"))?
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_owned).with_context(|| {
                        format!("deploy/daemonset.yaml: the agent's {key} has a non-string item")
                    })
                })
                .collect()
        };
        let reference = agent["image"]
            .as_str()
            .context("deploy/daemonset.yaml: the agent has no image")?
            .to_owned();
        let (name, tag) = split_reference(&reference)
            .with_context(|| format!("deploy/daemonset.yaml: image {reference:?} has no tag"))?;
        let entrypoint = strings("command")?;
        ensure!(
            entrypoint.first().is_some_and(|b| b.starts_with('/')),
            "deploy/daemonset.yaml: the agent's command must start with the binary's absolute path"
        );
        Ok(Self {
            full_reference: format!("{}:{tag}", qualify(name)),
            tag: tag.to_owned(),
            reference,
            entrypoint,
            cmd: strings("args")?,
        })
    }

    /// Where the binary lives in the image, without the leading `/`.
    fn binary_path(&self) -> &str {
        self.entrypoint[0].trim_start_matches('/')
    }
}

/// `name:tag` → (`name`, `tag`); a `:` inside a registry host (`host:5000/x`) is not a tag.
fn split_reference(reference: &str) -> Option<(&str, &str)> {
    let (name, tag) = reference.rsplit_once(':')?;
    (!tag.contains('/') && !tag.is_empty() && !reference.contains('@')).then_some((name, tag))
}

/// Docker's normalisation: `svc-lb` → `docker.io/library/svc-lb`, `me/x` → `docker.io/me/x`;
/// a first component with a `.` or `:` (or `localhost`) is a registry and stays.
fn qualify(name: &str) -> String {
    match name.split_once('/') {
        Some((first, _)) if first.contains(['.', ':']) || first == "localhost" => name.to_owned(),
        Some(_) => format!("docker.io/{name}"),
        None => format!("docker.io/library/{name}"),
    }
}

pub fn image(ctx: &Ctx, args: &ImageArgs) -> Result<PathBuf> {
    let spec = deploy_spec(ctx)?;
    let triple = host_triple()?;
    let bin = build_static(ctx, &triple)?;
    ensure_static(&bin)?;
    let out = match &args.output {
        Some(p) => p.clone(),
        None => default_archive(ctx),
    };
    let source = Source::from_git(&ctx.ws)?;
    step(format!("image: {} (FROM scratch)", spec.reference));
    let written = write_archive(&spec, &bin, &source, arch_of(&triple)?, &out)?;
    note(format!(
        "{}: {:.1} MB (binary {:.1} MB, compressed layer {:.1} MB)",
        out.display(),
        mb(written.archive_bytes),
        mb(written.binary_bytes),
        mb(written.layer_bytes)
    ));
    note(format!(
        "revision {}, created {}",
        source.revision, source.created
    ));
    note("load it where the DaemonSet runs:");
    note(format!(
        "  kind:       kind load image-archive {}",
        out.display()
    ));
    note(format!(
        "  containerd: ctr -n k8s.io images import {}",
        out.display()
    ));
    note(format!("  podman:     podman load -i {}", out.display()));
    note("then: kubectl apply -k deploy/");
    Ok(out)
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1_000_000.0
}

/// target/image/svc-lb-<version>.oci.tar
pub fn default_archive(ctx: &Ctx) -> PathBuf {
    ctx.target
        .join("image")
        .join(format!("svc-lb-{VERSION}.oci.tar"))
}

/// The DaemonSet's image, checked against the workspace version.
pub fn deploy_spec(ctx: &Ctx) -> Result<ImageSpec> {
    let path = ctx.ws.join("deploy").join("daemonset.yaml");
    let text = fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let spec = ImageSpec::from_daemonset(&text)?;
    ensure!(
        spec.tag == VERSION,
        "deploy/daemonset.yaml runs image {} but the workspace version is {VERSION}: the tag \
         must be the version (set it there and in deploy/kustomization.yaml)",
        spec.reference
    );
    Ok(spec)
}

fn host_triple() -> Result<String> {
    let vv = output(Command::new("rustc").arg("-vV"))?;
    let host = vv
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .context("`rustc -vV` printed no host line")?;
    ensure!(
        host.ends_with("-unknown-linux-gnu"),
        "the image is built from a static glibc binary; host {host} is not a *-unknown-linux-gnu target"
    );
    Ok(host.to_owned())
}

/// The OCI (Go) name of the triple's architecture.
fn arch_of(triple: &str) -> Result<Arch> {
    Ok(match triple.split('-').next() {
        Some("x86_64") => Arch::Amd64,
        Some("aarch64") => Arch::ARM64,
        other => bail!("no OCI architecture known for {other:?}"),
    })
}

/// The agent as one static executable: glibc with `crt-static`, so the image needs no
/// libc. An explicit `--target` keeps it apart from target/release (a second build of
/// the same sources) and keeps the flag off build scripts and proc macros; the eBPF
/// object is built by aya-build with its own flags (CARGO_ENCODED_RUSTFLAGS), which this
/// flag does not reach.
fn build_static(ctx: &Ctx, triple: &str) -> Result<PathBuf> {
    step(format!(
        "image: static release build of svc-lb ({triple}, crt-static)"
    ));
    let rustflags = format!("target.{triple}.rustflags=[\"-C\", \"target-feature=+crt-static\"]");
    run(&mut ctx.cargo([
        "build",
        "--release",
        "--locked",
        "-p",
        "svc-lb",
        "--bin",
        "svc-lb",
        "--target",
        triple,
        "--config",
        &rustflags,
    ])?)?;
    let bin = ctx.target.join(triple).join("release").join("svc-lb");
    ensure!(
        bin.is_file(),
        "the build succeeded but {} does not exist",
        bin.display()
    );
    Ok(bin)
}

/// Fails unless `bin` is an ELF executable that asks for no program interpreter (a
/// dynamically linked binary names ld.so in PT_INTERP and would not start in the image).
fn ensure_static(bin: &Path) -> Result<()> {
    let elf = fs::read(bin).with_context(|| format!("read {}", bin.display()))?;
    match elf_interpreter(&elf) {
        Ok(None) => Ok(()),
        Ok(Some(interp)) => bail!(
            "{} is dynamically linked (interpreter {interp}); the image has no libc",
            bin.display()
        ),
        Err(e) => Err(e).with_context(|| format!("{} is not a 64-bit ELF file", bin.display())),
    }
}

/// The PT_INTERP path of a 64-bit little-endian ELF file, if it has one.
pub fn elf_interpreter(elf: &[u8]) -> Result<Option<String>> {
    const PT_INTERP: u32 = 3;
    let u16_at = |o: usize| elf.get(o..o + 2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let u32_at = |o: usize| {
        elf.get(o..o + 4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    };
    let u64_at = |o: usize| {
        elf.get(o..o + 8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
    };
    ensure!(
        elf.starts_with(b"\x7fELF\x02\x01"),
        "no ELF64 little-endian header"
    );
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        bail!("truncated ELF header");
    };
    for i in 0..usize::from(phnum) {
        let ph = usize::try_from(phoff)? + i * usize::from(phentsize);
        if u32_at(ph).context("truncated program header")? != PT_INTERP {
            continue;
        }
        let (Some(off), Some(size)) = (u64_at(ph + 0x08), u64_at(ph + 0x20)) else {
            bail!("truncated PT_INTERP header");
        };
        let (off, size) = (usize::try_from(off)?, usize::try_from(size)?);
        let raw = elf
            .get(off..off + size)
            .context("PT_INTERP outside the file")?;
        return Ok(Some(
            String::from_utf8_lossy(raw)
                .trim_end_matches('\0')
                .to_owned(),
        ));
    }
    Ok(None)
}

/// Where the image comes from: the commit, and its time (used as the image's creation
/// time and every file's mtime, so the same commit gives the same image digest).
pub struct Source {
    pub revision: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub epoch: u64,
}

impl Source {
    fn from_git(ws: &Path) -> Result<Self> {
        let git = |args: &[&str]| -> Result<String> {
            Ok(output(Command::new("git").arg("-C").arg(ws).args(args))?
                .trim()
                .to_owned())
        };
        let mut revision = git(&["rev-parse", "HEAD"]).context("the image's revision label")?;
        // A build from uncommitted changes must not pass for the commit.
        if !git(&["status", "--porcelain", "--untracked-files=no"])?.is_empty() {
            revision.push_str("-dirty");
        }
        let epoch: u64 = git(&["log", "-1", "--format=%ct"])?
            .parse()
            .context("git printed a non-numeric commit time")?;
        let mut utc = Command::new("git");
        utc.arg("-C")
            .arg(ws)
            .args([
                "log",
                "-1",
                "--date=format-local:%Y-%m-%dT%H:%M:%SZ",
                "--format=%cd",
            ])
            .env("TZ", "UTC");
        let created = output(&mut utc)?.trim().to_owned();
        Ok(Self {
            revision,
            created,
            epoch,
        })
    }
}

/// Sizes of what [`write_archive`] wrote.
pub struct Written {
    pub archive_bytes: u64,
    pub binary_bytes: u64,
    pub layer_bytes: u64,
}

/// A blob of the layout: its bytes and their descriptor.
struct Blob {
    bytes: Vec<u8>,
    digest: Digest,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Result<Self> {
        let digest = sha256(&bytes)?;
        Ok(Self { bytes, digest })
    }

    fn descriptor(
        &self,
        media_type: MediaType,
        annotations: Option<BTreeMap<String, String>>,
    ) -> Result<Descriptor> {
        let mut d = DescriptorBuilder::default()
            .media_type(media_type)
            .digest(self.digest.clone())
            .size(self.bytes.len() as u64);
        if let Some(a) = annotations {
            d = d.annotations(a.into_iter().collect::<std::collections::HashMap<_, _>>());
        }
        Ok(d.build()?)
    }
}

fn sha256(bytes: &[u8]) -> Result<Digest> {
    let hex: String = Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(format!("sha256:{hex}").parse()?)
}

/// JSON with sorted object keys (oci-spec keeps labels in HashMaps, whose order changes
/// from run to run): the same input gives the same bytes, hence the same digests.
fn canonical_json(value: &impl Serialize) -> Result<Vec<u8>> {
    Ok(serde_json::to_vec(&serde_json::to_value(value)?)?)
}

/// The labels (image config) and annotations (manifest) every image gets.
fn labels(spec: &ImageSpec, source: &Source) -> BTreeMap<String, String> {
    [
        (ANNOTATION_TITLE, "svc-lb"),
        (
            ANNOTATION_DESCRIPTION,
            "eBPF Kubernetes Service load balancer (kube-proxy replacement)",
        ),
        (ANNOTATION_VERSION, spec.tag.as_str()),
        (ANNOTATION_REVISION, source.revision.as_str()),
        (ANNOTATION_SOURCE, SOURCE),
        (ANNOTATION_LICENSES, LICENSE),
        (ANNOTATION_CREATED, source.created.as_str()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

/// The one layer: the binary at the entrypoint's path, owned by root, mode 0755 (so a
/// non-root user could run it too), and its parent directories.
fn layer_tar(spec: &ImageSpec, binary: &[u8], mtime: u64) -> Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let path = Path::new(spec.binary_path());
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    for dir in dirs.into_iter().filter(|d| !d.as_os_str().is_empty()) {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(mtime);
        h.set_size(0);
        tar.append_data(&mut h, dir, std::io::empty())
            .with_context(|| format!("layer: add {}", dir.display()))?;
    }
    let mut h = tar::Header::new_ustar();
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o755);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(mtime);
    h.set_size(binary.len() as u64);
    tar.append_data(&mut h, path, binary)
        .with_context(|| format!("layer: add {}", path.display()))?;
    tar.into_inner().context("layer: finish the tarball")
}

/// Writes the OCI archive: a tarball of an OCI image layout (`oci-layout`, `index.json`,
/// `blobs/sha256/*`) holding one linux image.
pub fn write_archive(
    spec: &ImageSpec,
    binary: &Path,
    source: &Source,
    arch: Arch,
    out: &Path,
) -> Result<Written> {
    let bin = fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    let tar = layer_tar(spec, &bin, source.epoch)?;
    let diff_id = sha256(&tar)?;
    let mut gz = GzEncoder::new(Vec::new(), Compression::best());
    gz.write_all(&tar).context("gzip the layer")?;
    let layer = Blob::new(gz.finish().context("gzip the layer")?)?;
    let labels = labels(spec, source);

    let config = ImageConfigurationBuilder::default()
        .created(source.created.clone())
        .architecture(arch.clone())
        .os(Os::Linux)
        .config(
            ConfigBuilder::default()
                .entrypoint(spec.entrypoint.clone())
                .cmd(spec.cmd.clone())
                .working_dir("/")
                .labels(
                    labels
                        .clone()
                        .into_iter()
                        .collect::<std::collections::HashMap<_, _>>(),
                )
                .build()?,
        )
        .rootfs(
            RootFsBuilder::default()
                .typ("layers")
                .diff_ids(vec![diff_id.to_string()])
                .build()?,
        )
        .history(vec![
            HistoryBuilder::default()
                .created(source.created.clone())
                .created_by(format!(
                    "cargo xtask image: static svc-lb at {}",
                    spec.entrypoint[0]
                ))
                .build()?,
        ])
        .build()?;
    let config = Blob::new(canonical_json(&config)?)?;

    let manifest = ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageManifest)
        .config(config.descriptor(MediaType::ImageConfig, None)?)
        .layers(vec![layer.descriptor(MediaType::ImageLayerGzip, None)?])
        .annotations(
            labels
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
        )
        .build()?;
    let manifest = Blob::new(canonical_json(&manifest)?)?;
    let mut manifest_desc = manifest.descriptor(
        MediaType::ImageManifest,
        Some(BTreeMap::from([
            (ANNOTATION_REF_NAME.to_owned(), spec.full_reference.clone()),
            (
                CONTAINERD_IMAGE_NAME.to_owned(),
                spec.full_reference.clone(),
            ),
        ])),
    )?;
    manifest_desc.set_platform(Some(
        PlatformBuilder::default()
            .architecture(arch)
            .os(Os::Linux)
            .build()?,
    ));
    let index = ImageIndexBuilder::default()
        .schema_version(2u32)
        .media_type(MediaType::ImageIndex)
        .manifests(vec![manifest_desc])
        .build()?;

    if let Some(dir) = out.parent() {
        fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    // Written next door and renamed in: a reader never sees half an archive.
    let partial = out.with_extension("tar.partial");
    let file =
        fs::File::create(&partial).with_context(|| format!("create {}", partial.display()))?;
    let mut archive = tar::Builder::new(std::io::BufWriter::new(file));
    let mut add = |name: &str, bytes: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_mtime(source.epoch);
        h.set_size(bytes.len() as u64);
        h.set_entry_type(tar::EntryType::Regular);
        archive
            .append_data(&mut h, name, bytes)
            .with_context(|| format!("archive: add {name}"))
    };
    add(
        "oci-layout",
        &canonical_json(&serde_json::json!({"imageLayoutVersion": "1.0.0"}))?,
    )?;
    add("index.json", &canonical_json(&index)?)?;
    for blob in [&layer, &config, &manifest] {
        add(
            &format!("blobs/sha256/{}", blob.digest.digest()),
            &blob.bytes,
        )?;
    }
    archive
        .into_inner()
        .context("archive: finish")?
        .flush()
        .context("archive: flush")?;
    fs::rename(&partial, out).with_context(|| format!("rename into {}", out.display()))?;
    Ok(Written {
        archive_bytes: fs::metadata(out)
            .with_context(|| format!("stat {}", out.display()))?
            .len(),
        binary_bytes: bin.len() as u64,
        layer_bytes: layer.bytes.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DS: &str = "
spec:
  template:
    spec:
      initContainers:
        - name: bpffs
          image: other:1
      containers:
        - name: agent
          image: svc-lb:1.2.3
          command: [\"/usr/local/bin/svc-lb\"]
          args: [agent, --log-format=json]
";

    #[test]
    fn spec_comes_from_the_agent_container() {
        let s = ImageSpec::from_daemonset(DS).expect("parses");
        assert_eq!(s.reference, "svc-lb:1.2.3");
        assert_eq!(s.full_reference, "docker.io/library/svc-lb:1.2.3");
        assert_eq!(s.tag, "1.2.3");
        assert_eq!(s.entrypoint, ["/usr/local/bin/svc-lb"]);
        assert_eq!(s.cmd, ["agent", "--log-format=json"]);
        assert_eq!(s.binary_path(), "usr/local/bin/svc-lb");
        let relative = DS.replace("\"/usr/local/bin/svc-lb\"", "svc-lb");
        assert!(ImageSpec::from_daemonset(&relative).is_err());
        let untagged = DS.replace("svc-lb:1.2.3", "svc-lb");
        assert!(ImageSpec::from_daemonset(&untagged).is_err());
    }

    #[test]
    fn references_are_qualified_like_docker_does() {
        assert_eq!(qualify("svc-lb"), "docker.io/library/svc-lb");
        assert_eq!(qualify("me/svc-lb"), "docker.io/me/svc-lb");
        assert_eq!(qualify("ghcr.io/me/svc-lb"), "ghcr.io/me/svc-lb");
        assert_eq!(qualify("localhost:5000/svc-lb"), "localhost:5000/svc-lb");
        assert_eq!(split_reference("host:5000/svc-lb"), None);
        assert_eq!(
            split_reference("host:5000/svc-lb:1"),
            Some(("host:5000/svc-lb", "1"))
        );
    }

    #[test]
    fn the_deploy_manifest_names_this_version() {
        let ws = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let text = fs::read_to_string(ws.join("deploy/daemonset.yaml")).expect("read");
        let spec = ImageSpec::from_daemonset(&text).expect("parses");
        assert_eq!(spec.tag, VERSION);
    }

    #[test]
    fn interpreter_of_this_test_binary_and_of_garbage() {
        // The test binary itself is linked dynamically (no crt-static for tests).
        let me = fs::read(std::env::current_exe().expect("exe")).expect("read");
        let interp = elf_interpreter(&me).expect("ELF");
        assert!(interp.is_some_and(|i| i.contains("ld-linux")));
        assert!(elf_interpreter(b"#!/bin/sh\n").is_err());
        assert!(elf_interpreter(b"\x7fELF\x02\x01").is_err());
    }
}
