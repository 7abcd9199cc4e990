//! Checks the manifests in `deploy/` against the agent itself: every document parses
//! into its k8s-openapi type, the RBAC rules grant exactly the API calls the agent
//! makes, the DaemonSet's arguments are accepted by the real command line, its probes
//! point at the health endpoint those arguments configure, the image tag is the workspace
//! version (the image `cargo xtask image` builds takes its tag, entrypoint and args from
//! the DaemonSet; tests/tests/image.rs checks the built archive against it), and only a
//! short-lived init container is privileged: the agent container gets a read-only root,
//! no privilege escalation and a fixed list of capabilities.
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
        rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding},
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
                "Role" => serde_yaml::from_value::<Role>(doc).map(|_| ()),
                "RoleBinding" => serde_yaml::from_value::<RoleBinding>(doc).map(|_| ()),
                "ConfigMap" => serde_yaml::from_value::<ConfigMap>(doc).map(|_| ()),
                other => panic!("{file}: unexpected kind {other:?}"),
            };
            parsed.unwrap_or_else(|e| panic!("{file}: {kind}: {e}"));
        }
    }
}

/// (group, resource, verb) for every verb of `rules`: plain rules, no wildcards.
fn grants(rules: Option<Vec<PolicyRule>>) -> BTreeSet<(String, String, String)> {
    let mut granted = BTreeSet::new();
    for rule in rules.unwrap_or_default() {
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
    granted
}

/// The LB-IPAM Lease is in the agent's namespace: its rights are a Role there.
fn namespaced(group: &str, resource: &str) -> bool {
    (group, resource) == ("coordination.k8s.io", "leases")
}

#[test]
fn rbac_grants_exactly_what_the_agent_calls() {
    let role: ClusterRole = one("rbac.yaml", "ClusterRole");
    let lease_role: Role = one("rbac.yaml", "Role");
    let cluster_wide = grants(role.rules.clone());
    let in_namespace = grants(lease_role.rules.clone());
    let called: BTreeSet<(String, String, String)> = API_ACCESS
        .iter()
        .flat_map(|a| {
            a.verbs
                .iter()
                .map(|v| (a.group.to_owned(), a.resource.to_owned(), (*v).to_owned()))
        })
        .collect();
    let (want_ns, want_cluster): (BTreeSet<_>, BTreeSet<_>) =
        called.into_iter().partition(|(g, r, _)| namespaced(g, r));
    assert_eq!(cluster_wide, want_cluster);
    assert_eq!(in_namespace, want_ns);
    assert!(!want_ns.is_empty(), "the Lease's rights are namespaced");

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

    // The Role and its binding sit in the agent's namespace (where the Lease is: the
    // client's default namespace in a pod is the service account's).
    let lease_binding: RoleBinding = one("rbac.yaml", "RoleBinding");
    assert_eq!(lease_role.metadata.namespace, sa.metadata.namespace);
    assert_eq!(lease_binding.metadata.namespace, sa.metadata.namespace);
    assert_eq!(lease_binding.role_ref.kind, "Role");
    assert_eq!(
        Some(&lease_binding.role_ref.name),
        lease_role.metadata.name.as_ref()
    );
    let subjects = lease_binding.subjects.unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), sa.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace, sa.metadata.namespace);
}

#[test]
fn daemonset_runs_the_agent_as_a_node_critical_host_agent() {
    let ds: DaemonSet = one("daemonset.yaml", "DaemonSet");
    let pod = ds.spec.template.spec.clone().expect("a pod spec");
    assert_eq!(pod.host_network, Some(true));
    // Socket termination reaches the pods' network namespaces through /proc.
    assert_eq!(pod.host_pid, Some(true));
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
    // Bidirectional propagation is accepted for privileged containers only; the init
    // container has it, the agent sees the host's mounts.
    assert_eq!(bpffs.mount_propagation.as_deref(), Some("HostToContainer"));
    assert_eq!(host_path("bpffs").as_deref(), Some("/sys/fs/bpf"));
    let cgroup = mounts
        .iter()
        .find(|m| m.name == "cgroup2")
        .expect("cgroup2 mount");
    assert_eq!(host_path("cgroup2").as_deref(), Some("/sys/fs/cgroup"));

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

/// What the image holds: the binary at this path is its entrypoint (`cargo xtask image`
/// puts it there because the DaemonSet's command says so).
const BINARY: &str = "/usr/local/bin/svc-lb";

/// The capabilities the agent uses (tests/tests/image.rs runs the image's agent with
/// exactly the DaemonSet's list, so a missing one fails there).
const AGENT_CAPABILITIES: &[&str] = &[
    "BPF",
    "NET_ADMIN",
    "NET_RAW",
    "PERFMON",
    "SYS_ADMIN",
    "SYS_PTRACE",
];

#[test]
fn image_tag_is_the_workspace_version_and_the_entrypoint_the_binary() {
    let version = env!("CARGO_PKG_VERSION");
    let want = format!("svc-lb:{version}");
    let ds: DaemonSet = one("daemonset.yaml", "DaemonSet");
    let pod = ds.spec.template.spec.clone().expect("a pod spec");
    let init = pod.init_containers.clone().unwrap_or_default();
    for c in pod.containers.iter().chain(&init) {
        assert_eq!(c.image.as_deref(), Some(want.as_str()), "{}: image", c.name);
        assert_eq!(
            c.image_pull_policy.as_deref(),
            Some("IfNotPresent"),
            "{}: a loaded image is never pulled",
            c.name
        );
        assert_eq!(
            c.command.as_deref(),
            Some(&[BINARY.to_owned()][..]),
            "{}: command",
            c.name
        );
    }
    assert_eq!(
        Path::new(BINARY).file_name().and_then(|n| n.to_str()),
        Some(env!("CARGO_PKG_NAME")),
        "the binary is this crate's"
    );
    // kustomize rewrites the image by name; its tag must be the same version.
    let k = documents("kustomization.yaml");
    let images = k[0].1["images"]
        .as_sequence()
        .expect("kustomization images");
    assert_eq!(images.len(), 1);
    assert_eq!(images[0]["name"].as_str(), Some("svc-lb"));
    assert_eq!(images[0]["newName"].as_str(), Some("svc-lb"));
    assert_eq!(images[0]["newTag"].as_str(), Some(version));
    // The image is built by `cargo xtask image`, not from a Dockerfile that pulls a base.
    assert!(!deploy_dir().join("Dockerfile").exists());
}

#[test]
fn only_the_init_container_is_privileged() {
    let ds: DaemonSet = one("daemonset.yaml", "DaemonSet");
    let pod = ds.spec.template.spec.clone().expect("a pod spec");
    let c = agent_container(&ds);
    let sc = c.security_context.clone().expect("a security context");
    assert_ne!(sc.privileged, Some(true), "the agent is not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.read_only_root_filesystem, Some(true));
    let caps = sc.capabilities.clone().expect("capabilities");
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
    let added: BTreeSet<&str> = caps.add.iter().flatten().map(String::as_str).collect();
    assert_eq!(added, AGENT_CAPABILITIES.iter().copied().collect());
    // Without --xdp the agent changes no sysctl; with it, accept_local must be set on the
    // host, which the securityContext comment says.
    let Command::Agent { xdp, bpffs, .. } = parsed_args(&c).command else {
        panic!("the DaemonSet must run `svc-lb agent`");
    };
    assert!(
        !xdp,
        "--xdp writes /proc/sys, read-only in an unprivileged container"
    );
    let text = std::fs::read_to_string(deploy_dir().join("daemonset.yaml")).expect("read");
    let agent_sc = &text[text.find("- name: agent").expect("agent")..];
    let agent_sc = &agent_sc[agent_sc.find("securityContext:").expect("securityContext")..];
    let comment: String = agent_sc
        .lines()
        .skip(1)
        .take_while(|l| l.trim_start().starts_with('#') || l.trim().is_empty())
        .collect();
    assert!(
        comment.contains("accept_local"),
        "securityContext comment: {comment}"
    );

    // The init container: privileged, short-lived, preparing the same pin directory.
    let init = pod.init_containers.clone().unwrap_or_default();
    assert_eq!(init.len(), 1, "one init container");
    let prep = &init[0];
    let psc = prep
        .security_context
        .clone()
        .expect("init security context");
    assert_eq!(psc.privileged, Some(true));
    let Command::Prepare { bpffs: prep_bpffs } = parsed_args(prep).command else {
        panic!("the init container must run `svc-lb prepare`");
    };
    assert_eq!(
        prep_bpffs, bpffs,
        "the init container prepares the agent's pin directory"
    );
    let m = prep
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "bpffs")
        .expect("init container mounts bpffs");
    assert_eq!(m.mount_path, "/sys/fs/bpf");
    assert_eq!(m.mount_propagation.as_deref(), Some("Bidirectional"));
}

/// The MetalLB CRDs (deploy/crds/) parse, and their schemas describe every spec field
/// the agent reads (so that the API server does not prune one away).
#[test]
fn metallb_crds_describe_every_field_the_agent_reads() {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use svc_lb::source::metallb::{
        IPAddressPool, IPAddressPoolSpec, L2Advertisement, L2AdvertisementSpec, ServiceAllocation,
    };
    let crds: Vec<CustomResourceDefinition> = documents("crds/metallb.yaml")
        .into_iter()
        .map(|(kind, doc)| {
            assert_eq!(kind, "CustomResourceDefinition");
            serde_yaml::from_value(doc).expect("a CustomResourceDefinition")
        })
        .collect();
    let full_pool = serde_json::to_value(IPAddressPool {
        spec: IPAddressPoolSpec {
            addresses: vec!["192.0.2.0/24".into()],
            auto_assign: Some(true),
            avoid_buggy_ips: Some(true),
            service_allocation: Some(ServiceAllocation {
                priority: Some(1),
                namespaces: Some(vec![]),
                namespace_selectors: Some(vec![]),
                service_selectors: Some(vec![]),
            }),
        },
        ..Default::default()
    })
    .expect("serialize");
    let full_l2 = serde_json::to_value(L2Advertisement {
        spec: L2AdvertisementSpec {
            ip_address_pools: Some(vec![]),
            ip_address_pool_selectors: Some(vec![]),
            node_selectors: Some(vec![]),
            interfaces: Some(vec![]),
        },
        ..Default::default()
    })
    .expect("serialize");
    for (kind, full) in [("IPAddressPool", full_pool), ("L2Advertisement", full_l2)] {
        let crd = crds
            .iter()
            .find(|c| c.spec.names.kind == kind)
            .unwrap_or_else(|| panic!("no CRD for {kind}"));
        assert_eq!(crd.spec.group, "metallb.io");
        let version = crd
            .spec
            .versions
            .iter()
            .find(|v| v.name == "v1beta1" && v.served && v.storage)
            .expect("v1beta1 served and stored");
        let schema = version
            .schema
            .as_ref()
            .and_then(|s| s.open_api_v3_schema.as_ref())
            .expect("a schema");
        let spec = &schema.properties.as_ref().expect("properties")["spec"];
        let described: BTreeSet<&String> = spec
            .properties
            .as_ref()
            .expect("spec properties")
            .keys()
            .collect();
        for field in full["spec"].as_object().expect("spec").keys() {
            assert!(
                described.contains(field),
                "{kind}: spec.{field} is not in the CRD"
            );
        }
    }
}
