//! The container image that `cargo xtask image` writes (its path in `$SVC_LB_IMAGE`; `cargo
//! xtask test` builds it and runs this file as its own step).
//!
//! The archive is unpacked with umoci, a reader independent of the writer that checks
//! every digest. The image config must say what deploy/daemonset.yaml and the workspace
//! say (entrypoint, args, tag, version, revision, architecture), and the root filesystem
//! must hold the binary and nothing else: no shell, no libc. Then the unpacked binary
//! runs the way the DaemonSet runs it: from a chroot into that read-only root, in its own
//! mount namespace, with only /proc, the host's /sys (bpffs and cgroup2 under it) and
//! the manifest directory mounted, and only the capabilities the DaemonSet grants. In
//! that form it serves one Service to a client in a network namespace (every connection
//! counted), restarts and adopts its pins, and `cleanup` from the same chroot detaches
//! its programs.
//!
//! Run as root: `SVC_LB_IMAGE=target/image/svc-lb-<version>.oci.tar cargo test --release
//! -p svc-lb-tests --features e2e,image --test image`.

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context, Result, ensure};
use serde_json::Value;
use svc_lb_tests::{
    Bins, Lab, Proto,
    bpfquery::sock_program_counts,
    cmd,
    lab::isolated,
    manifests::{EndpointSlice, Protocol, Service, TargetPort, yaml_docs},
    tempdir::TempDir,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The agent container of deploy/daemonset.yaml.
fn daemonset_agent() -> Value {
    let path = workspace().join("deploy/daemonset.yaml");
    let text = std::fs::read_to_string(&path).expect("read deploy/daemonset.yaml");
    let ds: Value = serde_yaml::from_str(&text).expect("deploy/daemonset.yaml is YAML");
    ds["spec"]["template"]["spec"]["containers"]
        .as_array()
        .expect("containers")
        .iter()
        .find(|c| c["name"] == "agent")
        .expect("an agent container")
        .clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .expect("a list")
        .iter()
        .map(|s| s.as_str().expect("a string").to_owned())
        .collect()
}

/// The archive unpacked: the OCI layout, and umoci's runtime bundle made from it.
struct Unpacked {
    _dir: TempDir,
    layout: PathBuf,
    bundle: PathBuf,
    reference: String,
}

impl Unpacked {
    fn rootfs(&self) -> PathBuf {
        self.bundle.join("rootfs")
    }

    fn json(&self, rel: &str) -> Result<Value> {
        let p = self.layout.join(rel);
        let text = std::fs::read(&p).with_context(|| format!("read {}", p.display()))?;
        serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", p.display()))
    }

    fn blob(&self, digest: &Value) -> Result<Value> {
        let digest = digest.as_str().context("a digest string")?;
        let hex = digest
            .strip_prefix("sha256:")
            .with_context(|| format!("{digest} is not a sha256 digest"))?;
        self.json(&format!("blobs/sha256/{hex}"))
    }
}

fn unpack() -> Result<Unpacked> {
    let archive = std::env::var_os("SVC_LB_IMAGE").context(
        "SVC_LB_IMAGE is not set: build the image with `cargo xtask image` and point \
         SVC_LB_IMAGE at target/image/svc-lb-<version>.oci.tar",
    )?;
    let dir = TempDir::new()?;
    let layout = dir.path().join("layout");
    std::fs::create_dir(&layout).context("create layout dir")?;
    cmd::run(
        "tar",
        [
            "-xf".as_ref(),
            archive.as_os_str(),
            "-C".as_ref(),
            layout.as_os_str(),
        ],
    )?;
    let index: Value = serde_json::from_slice(
        &std::fs::read(layout.join("index.json")).context("read index.json")?,
    )?;
    let manifests = index["manifests"].as_array().context("index.manifests")?;
    ensure!(manifests.len() == 1, "one image in the archive: {index}");
    let reference = manifests[0]["annotations"]["org.opencontainers.image.ref.name"]
        .as_str()
        .context("the image's ref.name annotation")?
        .to_owned();
    let bundle = dir.path().join("bundle");
    // umoci reads `<layout>:<ref>`, verifies every blob's digest and size, and extracts the
    // layers into bundle/rootfs with a runtime config.json made from the image config.
    let image_arg = format!("{}:{reference}", layout.display());
    cmd::run(
        "umoci",
        [
            "unpack".as_ref(),
            "--image".as_ref(),
            image_arg.as_ref(),
            bundle.as_os_str(),
        ],
    )?;
    Ok(Unpacked {
        _dir: dir,
        layout,
        bundle,
        reference,
    })
}

/// Every path under `root`, relative to it.
fn tree(root: &Path) -> Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("read {}", dir.display()))? {
            let e = e?;
            let rel = e.path().strip_prefix(root)?.display().to_string();
            if e.file_type()?.is_dir() {
                todo.push(e.path());
            }
            out.insert(rel);
        }
    }
    Ok(out)
}

fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => panic!("no OCI architecture known for {other}"),
    }
}

#[test]
fn image_config_matches_the_daemonset_and_the_workspace() {
    isolated(|| {
        let img = unpack().expect("unpack the image");
        let agent = daemonset_agent();
        let ds_image = agent["image"].as_str().expect("image");
        let version = env!("CARGO_PKG_VERSION");
        assert_eq!(ds_image, format!("svc-lb:{version}"), "the DaemonSet's tag");
        assert_eq!(img.reference, format!("docker.io/library/{ds_image}"));

        let index = img.json("index.json").expect("index.json");
        let desc = &index["manifests"][0];
        assert_eq!(
            desc["annotations"]["io.containerd.image.name"], img.reference,
            "containerd names the image after this"
        );
        assert_eq!(desc["platform"]["architecture"], oci_arch());
        assert_eq!(desc["platform"]["os"], "linux");
        let manifest = img.blob(&desc["digest"]).expect("the manifest");
        let layers = manifest["layers"].as_array().expect("layers");
        assert_eq!(layers.len(), 1, "one layer (FROM scratch): {manifest}");
        let config = img.blob(&manifest["config"]["digest"]).expect("the config");
        eprintln!("image config: {config}");
        assert_eq!(config["architecture"], oci_arch());
        assert_eq!(config["os"], "linux");
        let c = &config["config"];
        assert_eq!(strings(&c["Entrypoint"]), strings(&agent["command"]));
        assert_eq!(strings(&c["Cmd"]), strings(&agent["args"]));
        assert!(
            c["Env"].is_null(),
            "nothing in the image reads the environment's PATH"
        );
        let labels = &c["Labels"];
        assert_eq!(labels["org.opencontainers.image.title"], "svc-lb");
        assert_eq!(labels["org.opencontainers.image.version"], version);
        assert!(
            labels["org.opencontainers.image.source"]
                .as_str()
                .is_some_and(|s| s.starts_with("https://")),
            "source label: {labels}"
        );
        assert!(labels["org.opencontainers.image.created"].is_string());
        // The commit the image was built from: this checkout's HEAD (dirty or not).
        let head = cmd::run(
            "git",
            [
                "-C".as_ref(),
                workspace().as_os_str(),
                "rev-parse".as_ref(),
                "HEAD".as_ref(),
            ],
        )
        .expect("git rev-parse HEAD");
        let revision = labels["org.opencontainers.image.revision"]
            .as_str()
            .expect("revision label");
        assert_eq!(revision.trim_end_matches("-dirty"), head.trim());
        assert_eq!(manifest["annotations"], *labels, "manifest annotations");

        // umoci's runtime config: what a container runtime would exec.
        let runtime: Value = serde_json::from_slice(
            &std::fs::read(img.bundle.join("config.json")).expect("bundle config.json"),
        )
        .expect("JSON");
        let mut argv = strings(&agent["command"]);
        argv.extend(strings(&agent["args"]));
        assert_eq!(strings(&runtime["process"]["args"]), argv);

        // The binary and its directories, nothing else: no shell, no libc, no ld.so.
        let files = tree(&img.rootfs()).expect("list rootfs");
        let want: BTreeSet<String> = ["usr", "usr/local", "usr/local/bin", "usr/local/bin/svc-lb"]
            .map(str::to_owned)
            .into();
        assert_eq!(files, want);
        let bin = img.rootfs().join("usr/local/bin/svc-lb");
        let meta = std::fs::metadata(&bin).expect("stat the binary");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o755);
        let size = meta.len();
        eprintln!("binary {:.1} MB", size as f64 / 1e6);
        assert!(size < 30_000_000, "the binary is {size} bytes");
    });
}

/// `svc-lb <args>` from `root` the way the DaemonSet's container runs: a private mount
/// namespace, the root read-only, /proc, the host's /sys (with the bpffs and cgroup2
/// mounts under it) read-only at its top, the manifest directory read-only at its own
/// path, and the capability bounding set cut to the DaemonSet's list (plus SYS_CHROOT,
/// which the `chroot` step itself needs; nothing the agent does uses it). A shell script, because the lab runs it in
/// place of the agent binary for everything: the agent, `status` and `cleanup`.
fn chroot_wrapper(dir: &Path, root: &Path, manifests: &Path, caps: &[String]) -> Result<PathBuf> {
    for sub in ["proc", "sys"] {
        std::fs::create_dir_all(root.join(sub)).with_context(|| format!("create {sub}"))?;
    }
    let inside = root.join(
        manifests
            .strip_prefix("/")
            .context("absolute manifest dir")?,
    );
    std::fs::create_dir_all(&inside).with_context(|| format!("create {}", inside.display()))?;
    let bounding: Vec<String> = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|c| format!("+{}", c.to_ascii_lowercase())))
        .chain(std::iter::once("+sys_chroot".to_owned()))
        .collect();
    let script = format!(
        r#"#!/bin/sh
set -e
export R='{root}' M='{manifests}' CAPS='{caps}'
exec unshare --mount --propagation private -- /bin/sh -ec '
mount --bind "$R" "$R"
mount -o remount,bind,ro "$R"
mount -t proc proc "$R/proc"
mount --rbind /sys "$R/sys"
mount -o remount,bind,ro "$R/sys"
mount --bind "$M" "$R$M"
mount -o remount,bind,ro "$R$M"
exec setpriv --inh-caps=-all --bounding-set="$CAPS" chroot "$R" /usr/local/bin/svc-lb "$@"' sh "$@"
"#,
        root = root.display(),
        manifests = manifests.display(),
        caps = bounding.join(","),
    );
    let path = dir.join("svc-lb-in-image");
    std::fs::write(&path, script).context("write the chroot wrapper")?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
        .context("chmod the chroot wrapper")?;
    Ok(path)
}

#[test]
fn the_image_binary_serves_a_service_from_a_read_only_chroot() {
    isolated(|| {
        let img = unpack().expect("unpack the image");
        let root = img.rootfs();
        let version = cmd::run(
            "chroot",
            [
                root.as_os_str(),
                "/usr/local/bin/svc-lb".as_ref(),
                "--version".as_ref(),
            ],
        )
        .expect("svc-lb --version in the image");
        assert!(
            version.contains(env!("CARGO_PKG_VERSION")),
            "--version printed {version:?}"
        );

        let agent = daemonset_agent();
        let caps = strings(&agent["securityContext"]["capabilities"]["add"]);
        let mut bins =
            Bins::from_env(Some(env!("CARGO_BIN_EXE_svclb-harness"))).expect("locate binaries");
        // The lab makes its directories first; the wrapper needs the manifest path.
        let tmp = TempDir::new().expect("temp dir");
        bins.svc_lb = tmp.path().join("svc-lb-in-image");
        let mut lab = Lab::new(bins, &["a"]).expect("build the lab");
        chroot_wrapper(tmp.path(), &root, &lab.manifests_dir(), &caps).expect("the wrapper");
        if let Err(e) = serve_one_service(&mut lab) {
            panic!("{e:?}");
        }
    });
}

fn serve_one_service(lab: &mut Lab) -> Result<()> {
    let backend: IpAddr = lab.topo.backend("a").addr4.into();
    lab.serve_all_tcp(8080, false)?;
    let vip: IpAddr = "10.96.0.10".parse()?;
    let svc = Service::new("image", "web", &[vip]).port(
        "http",
        80,
        TargetPort::Number(8080),
        Protocol::Tcp,
    );
    let slice = EndpointSlice::new("image", "web", "x1", false)
        .port("http", 8080, Protocol::Tcp)
        .ready_endpoints(&[backend]);
    lab.write_manifest("web.yaml", &yaml_docs(&[svc.to_value(), slice.to_value()]))?;
    lab.start_agent()?;

    let mut o = lab.client(SocketAddr::new(vip, 80), Proto::Tcp);
    o.count = 100;
    let r = lab.run_client(&o)?;
    eprintln!("{}", r.summary());
    ensure!(
        r.attempts == 100 && r.ok == 100 && r.failed == 0 && r.count("a") == 100,
        "through the image's agent: {}",
        r.summary()
    );

    // A restart adopts the pinned maps and links with the same capabilities.
    let (exit, graceful) = lab
        .take_agent()
        .context("the agent")?
        .terminate(Duration::from_secs(5))?;
    ensure!(
        graceful && exit.success(),
        "the image's agent on SIGTERM: {exit}"
    );
    lab.start_agent()?;
    let r = lab.run_client(&o)?;
    ensure!(
        r.ok == 100 && r.failed == 0 && r.count("a") == 100,
        "after a restart: {}",
        r.summary()
    );

    let status = lab.svc_lb(&["status"])?;
    ensure!(
        status.status.success(),
        "status from the image: {}",
        String::from_utf8_lossy(&status.stderr)
    );
    let mut agent = lab.take_agent().context("the agent")?;
    let (exit, graceful) = agent.terminate(Duration::from_secs(5))?;
    ensure!(
        graceful && exit.success(),
        "the image's agent on SIGTERM: {exit}"
    );
    // Without --cgroup: detaching the pinned links needs no SYS_ADMIN (walking the
    // kernel's link ids for lost pins would, and the DaemonSet does not grant it).
    let out = lab.svc_lb(&["cleanup"])?;
    ensure!(
        out.status.success(),
        "cleanup from the image: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let counts = sock_program_counts(lab.cgroup())?;
    ensure!(
        counts.iter().all(|(_, n)| *n == 0),
        "programs still attached after cleanup: {counts:?}"
    );
    ensure!(
        !lab.bpffs().exists() || std::fs::read_dir(lab.bpffs())?.next().is_none(),
        "pins left in {}",
        lab.bpffs().display()
    );
    Ok(())
}
