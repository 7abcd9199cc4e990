//! Bad-input catalogue cases (tests/README.md) for single files, parsed as the directory
//! source parses them ([`parse_bytes`]).
use std::path::Path;

use crate::{
    model,
    source::{Snapshot, manifests::parse_bytes},
};

fn parse(name: &str, text: &str) -> Snapshot {
    parse_bytes(Path::new(name), text.as_bytes())
}

fn reasons(snap: &Snapshot) -> Vec<String> {
    snap.errors.iter().map(ToString::to_string).collect()
}

const GOOD: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: good}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";

#[test]
fn a_long_anchored_scalar_replayed_by_many_aliases_is_refused() {
    // Few events and nodes, but each alias replays a 4 KB string: without a budget on
    // replayed bytes, 4000 aliases would build 16 MB of strings from a 16 KB file.
    let text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: s, annotations: {{a: &x {}}}}}\nspec: {{ports: [{}]}}\n---\n{GOOD}",
        "A".repeat(4000),
        "*x, ".repeat(4000)
    );
    let snap = parse("replay.yaml", &text);
    let shown = reasons(&snap);
    assert_eq!(snap.errors.len(), 1, "{shown:#?}");
    assert!(
        shown[0].contains("document 1 (line 1): over the YAML budget"),
        "{shown:#?}"
    );
    assert_eq!(snap.services.len(), 1, "the good document still loads");
}

#[test]
fn duplicate_mapping_keys_are_refused_with_their_line() {
    let text = format!(
        "{GOOD}---\napiVersion: v1\nkind: Service\nmetadata: {{name: twice}}\nspec:\n  clusterIP: 10.96.0.2\n  clusterIP: 10.96.0.3\n  ports: [{{port: 80}}]\n"
    );
    let snap = parse("dup.yaml", &text);
    let shown = reasons(&snap);
    assert_eq!(snap.errors.len(), 1, "{shown:#?}");
    assert!(
        shown[0].contains("document 2 (line 5)") && shown[0].contains("duplicate"),
        "{shown:#?}"
    );
    assert_eq!(snap.services.len(), 1);
}

#[test]
fn non_finite_and_out_of_range_numbers_are_reported_by_field() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: inf}\nspec: {clusterIP: 10.96.0.4, ports: [{port: .inf}]}\n";
    let snap = parse("inf.yaml", yaml);
    let shown = reasons(&snap);
    assert_eq!(snap.errors.len(), 1, "{shown:#?}");
    assert!(
        shown[0].contains("Service default/inf")
            && shown[0].contains("spec.ports[0].port: invalid type"),
        "{shown:#?}"
    );
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: big}\nspec: {clusterIP: 10.96.0.5, ports: [{port: 4294967376}]}\n";
    let snap = parse("big.yaml", yaml);
    let shown = reasons(&snap);
    assert_eq!(snap.errors.len(), 1, "{shown:#?}");
    assert!(
        shown[0].contains("Service default/big") && shown[0].contains("spec.ports[0].port"),
        "{shown:#?}"
    );
    let json = r#"{"apiVersion": "v1", "kind": "Service", "metadata": {"name": "huge"}, "spec": {"ports": [{"port": 1e400}]}}"#;
    let snap = parse("huge.json", json);
    let shown = reasons(&snap);
    assert_eq!(snap.errors.len(), 1, "{shown:#?}");
    assert!(shown[0].contains("invalid JSON"), "{shown:#?}");
    assert!(snap.services.is_empty());
}

#[test]
fn yaml_tags_do_not_change_what_a_field_must_be() {
    // Tags are not types here: `!custom 80` is the number 80, and a `!!binary` cluster IP
    // is text that the model then refuses as not an IP address.
    let text = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: tagged}}\nspec: {{clusterIP: !!binary aGVsbG8=, ports: [{{port: !custom 80}}]}}\n---\n{GOOD}"
    );
    let snap = parse("tags.yaml", &text);
    assert!(snap.errors.is_empty(), "{:?}", reasons(&snap));
    assert_eq!(snap.services.len(), 2);
    let tagged = snap.services.values().next().expect("a Service");
    let spec = tagged.spec.as_ref().expect("a spec");
    assert_eq!(spec.ports[0].port, 80);
    let (state, errors) = model::build(&snap, &model::NodeInfo::default());
    assert_eq!(state.frontends.len(), 1, "only the good Service");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(errors[0].object.to_string(), "Service default/tagged");
    assert!(
        errors[0].reason.contains("is not a valid IP address"),
        "{}",
        errors[0]
    );
}

#[test]
fn empty_comment_only_bom_and_crlf_files_parse() {
    for (name, text) in [
        ("empty.yaml", ""),
        ("comments.yaml", "# nothing here\n---\n# nor here\n"),
        ("empty.json", ""),
    ] {
        let snap = parse(name, text);
        assert!(
            snap.errors.is_empty() && snap.services.is_empty(),
            "{name}: {snap:?}"
        );
    }
    let crlf = format!("\u{feff}{}", GOOD.replace('\n', "\r\n"));
    let snap = parse("crlf.yaml", &crlf);
    assert!(snap.errors.is_empty(), "{:?}", reasons(&snap));
    assert_eq!(snap.services.len(), 1);
}
