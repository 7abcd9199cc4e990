//! Checks the manifests in `deploy/` against the agent itself: every document parses
//! into its k8s-openapi type, the RBAC rules grant exactly the API calls the agent
//! makes, the DaemonSet's arguments are accepted by the real command line, its probes
//! point at the health endpoint those arguments configure, and the image's entrypoint is
//! the binary the DaemonSet runs.
use std::{
    collections::BTreeSet,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use clap::Parser;
use k8s_openapi::{
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Container, HTTPGetAction, ServiceAccount},
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::util::intstr::IntOrString,
};
use serde::Deserialize;
use svc_lb::{
    cli::{Cli, Command},
    source::kube::API_ACCESS,
};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every YAML document of `file`, with its `kind`.
fn documents(file: &str) -> Vec<(String, serde_yaml::Value)> {
    let path = deploy_dir().join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path:?}: {e}"));
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| {
            let v = serde_yaml::Value::deserialize(doc)
                .unwrap_or_else(|e| panic!("{file}: not YAML: {e}"));
            let kind = v["kind"].as_str().unwrap_or_default().to_owned();
            (kind, v)
        })
        .collect()
}

fn one<T: serde::de::DeserializeOwned>(file: &str, kind: &str) -> T {
    let docs: Vec<serde_yaml::Value> = documents(file)
        .into_iter()
        .filter(|(k, _)| k == kind)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(docs.len(), 1, "{file}: one {kind}");
    serde_yaml::from_value(docs[0].clone())
        .unwrap_or_else(|e| panic!("{file}: {kind} does not match the API type: {e}"))
}

fn agent_container(ds: &DaemonSet) -> Container {
    let spec = ds.spec.template.spec.as_ref().expect("a pod spec");
    assert_eq!(spec.containers.len(), 1, "one container");
    spec.containers[0].clone()
}

/// The DaemonSet's command and arguments as the agent's command line parses them.
fn parsed_args(c: &Container) -> Cli {
    let mut argv: Vec<String> = c.command.clone().unwrap_or_default();
    argv.extend(c.args.clone().unwrap_or_default());
    Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("the DaemonSet's arguments: {e}"))
}

#[test]
fn every_manifest_parses_into_its_api_type() {
    let kustomization = documents("kustomization.yaml");
    assert_eq!(kustomization.len(), 1);
    let resources: BTreeSet<String> = kustomization[0].1["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    let files: BTreeSet<String> = std::fs::read_dir(deploy_dir())
        .expect("read deploy/")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(resources, files, "kustomization.yaml lists every manifest");
    for file in &files {
        for (kind, doc) in documents(file) {
            let parsed = match kind.as_str() {
                "DaemonSet" => serde_yaml::from_value::<DaemonSet>(doc).map(|_| ()),
                "ServiceAccount" => serde_yaml::from_value::<ServiceAccount>(doc).map(|_| ()),
                "ClusterRole" => serde_yaml::from_value::<ClusterRole>(doc).map(|_| ()),
                "ClusterRoleBinding" => {
                    serde_yaml::from_value::<ClusterRoleBinding>(doc).map(|_| ())
                }
                "ConfigMap" => serde_yaml::from_value::<ConfigMap>(doc).map(|_| ()),
                other => panic!("{file}: unexpected kind {other:?}"),
            };
            parsed.unwrap_or_else(|e| panic!("{file}: {kind}: {e}"));
        }
    }
}

#[test]
fn rbac_grants_exactly_what_the_agent_calls() {
    let role: ClusterRole = one("rbac.yaml", "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.unwrap_or_default() {
        assert!(
            rule.resource_names.is_none() && rule.non_resource_urls.is_none(),
            "plain rules only"
        );
        for group in rule.api_groups.unwrap_or_default() {
            for resource in rule.resources.clone().unwrap_or_default() {
                for verb in &rule.verbs {
                    assert_ne!(verb, "*", "no wildcard verbs");
                    granted.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    let called: BTreeSet<(String, String, String)> = API_ACCESS
        .iter()
        .flat_map(|a| {
            a.verbs
                .iter()
                .map(|v| (a.group.to_owned(), a.resource.to_owned(), (*v).to_owned()))
        })
        .collect();
    assert_eq!(granted, called);

    let binding: ClusterRoleBinding = one("rbac.yaml", "ClusterRoleBinding");
    let sa: ServiceAccount = one("serviceaccount.yaml", "ServiceAccount");
    assert_eq!(binding.role_ref.kind, "ClusterRole");
    assert_eq!(Some(&binding.role_ref.name), role.metadata.name.as_ref());
    let subjects = binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
    let ds: DaemonSet = one("daemonset.yaml", "DaemonSet");
    let pod = ds.spec.template.spec.as_ref();
    assert_eq!(
        pod.and_then(|p| p.service_account_name.as_ref()),
        sa.metadata.name.as_ref()
    );
    assert_eq!(ds.metadata.namespace, sa.metadata.namespace);
}

#[test]
fn daemonset_runs_the_agent_as_a_node_critical_host_agent() {
    let ds: DaemonSet = one("daemonset.yaml", "DaemonSet");
    let pod = ds.spec.template.spec.clone().expect("a pod spec");
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    let tolerations = pod.tolerations.clone().unwrap_or_default();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists")
                && t.key.is_none()
                && t.effect.is_none()),
        "tolerates every taint"
    );

    let c = agent_container(&ds);
    let node_name = c
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .find(|e| e.name == "NODE_NAME")
        .and_then(|e| e.value_from)
        .and_then(|v| v.field_ref)
        .map(|f| f.field_path);
    assert_eq!(
        node_name.as_deref(),
        Some("spec.nodeName"),
        "NODE_NAME from the downward API"
    );

    // The mounts the agent needs: bpffs (bidirectional) and the host's cgroup2 root,
    // which the --bpffs and --cgroup arguments point into.
    let volumes = pod.volumes.clone().unwrap_or_default();
    let host_path = |name: &str| {
        volumes
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.host_path.as_ref())
            .map(|h| h.path.clone())
    };
    let mounts = c.volume_mounts.clone().unwrap_or_default();
    let bpffs = mounts
        .iter()
        .find(|m| m.name == "bpffs")
        .expect("bpffs mount");
    assert_eq!(bpffs.mount_path, "/sys/fs/bpf");
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("Bidirectional"));
    assert_eq!(host_path("bpffs").as_deref(), Some("/sys/fs/bpf"));
    let cgroup = mounts
        .iter()
        .find(|m| m.name == "cgroup2")
        .expect("cgroup2 mount");
    assert_eq!(host_path("cgroup2").as_deref(), Some("/sys/fs/cgroup"));
    // Bidirectional propagation is accepted for privileged containers only.
    let sc = c.security_context.clone().expect("a security context");
    assert_eq!(sc.privileged, Some(true));

    let Command::Agent {
        manifests,
        bpffs: bpffs_arg,
        cgroup: cgroup_arg,
        ..
    } = parsed_args(&c).command
    else {
        panic!("the DaemonSet must run `svc-lb agent`");
    };
    assert_eq!(manifests, None, "Kubernetes mode");
    assert!(bpffs_arg.starts_with(&bpffs.mount_path));
    assert_eq!(cgroup_arg.as_deref(), Some(Path::new(&cgroup.mount_path)));
}

#[test]
fn probes_point_at_the_health_endpoint() {
    let ds: DaemonSet = one("daemonset.yaml", "DaemonSet");
    let c = agent_container(&ds);
    let Command::Agent { health_addr, .. } = parsed_args(&c).command else {
        panic!("the DaemonSet must run `svc-lb agent`");
    };
    let addr: SocketAddr = health_addr
        .and_then(|a| a.0)
        .expect("health endpoints on, given explicitly (a port in use then stops the start)");
    let port_of = |get: &HTTPGetAction| match &get.port {
        IntOrString::Int(p) => u16::try_from(*p).expect("a port"),
        IntOrString::String(name) => c
            .ports
            .clone()
            .unwrap_or_default()
            .iter()
            .find(|p| p.name.as_deref() == Some(name))
            .map(|p| u16::try_from(p.container_port).expect("a port"))
            .unwrap_or_else(|| panic!("no container port named {name}")),
    };
    // Cloud load balancers probe every node's /healthz on kube-proxy's port.
    assert_eq!(addr, "0.0.0.0:10256".parse().expect("addr"));
    // Liveness ignores node eligibility (/livez): a Node being drained must not get its
    // agent restarted.
    for (probe, path) in [
        (c.liveness_probe.clone(), "/livez"),
        (c.readiness_probe.clone(), "/readyz"),
    ] {
        let get = probe.and_then(|p| p.http_get).expect("an HTTP probe");
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(port_of(&get), addr.port(), "{path} probe port");
        // hostNetwork: the kubelet dials the node's loopback, where the agent listens.
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"));
    }
}

#[test]
fn image_entrypoint_is_the_binary_the_daemonset_runs() {
    let dockerfile = std::fs::read_to_string(deploy_dir().join("Dockerfile")).expect("Dockerfile");
    let lines: Vec<&str> = dockerfile
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .collect();
    assert!(
        lines.iter().filter(|l| l.starts_with("FROM ")).count() >= 2,
        "multi-stage"
    );
    let entrypoint = lines
        .iter()
        .rev()
        .find_map(|l| l.strip_prefix("ENTRYPOINT "))
        .expect("an ENTRYPOINT");
    let entrypoint: Vec<String> = serde_json::from_str(entrypoint).expect("exec-form ENTRYPOINT");
    assert_eq!(entrypoint.len(), 1);
    let binary = &entrypoint[0];
    // The final stage copies the release binary of this crate to that path.
    let copy = lines
        .iter()
        .rev()
        .find(|l| l.starts_with("COPY --from="))
        .expect("the final stage copies the binary");
    assert!(copy.ends_with(binary.as_str()), "{copy}");
    assert_eq!(
        Path::new(binary).file_name().and_then(|n| n.to_str()),
        Some(env!("CARGO_PKG_NAME")),
        "the binary is this crate's"
    );
    assert!(dockerfile.contains("cargo build --release --locked -p svc-lb"));

    let ds: DaemonSet = one("daemonset.yaml", "DaemonSet");
    let c = agent_container(&ds);
    if let Some(command) = &c.command {
        assert_eq!(
            command, &entrypoint,
            "the DaemonSet's command is the entrypoint"
        );
    }
}
