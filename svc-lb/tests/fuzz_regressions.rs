//! Replays the fuzz inputs kept in the repository through the fuzz targets' checks
//! (`svc_lb::fuzzing`), on stable and without the fuzzer: every file under
//! `tests/fuzz/regressions/<target>/` (inputs that once failed) and
//! `tests/fuzz/seeds/<target>/`, and the example manifests for the parser and the model.
//! One test, so that the heap counter sees nothing else running.
use std::{
    fs,
    panic::{AssertUnwindSafe, catch_unwind},
    path::{Path, PathBuf},
};

#[global_allocator]
static ALLOC: svc_lb::fuzzing::CountingAlloc = svc_lb::fuzzing::CountingAlloc;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 5] = [
    ("manifest", svc_lb::fuzzing::manifest),
    ("model", svc_lb::fuzzing::model),
    ("codec", svc_lb::fuzzing::codec),
    ("lbipam", svc_lb::fuzzing::lbipam),
    ("weights", svc_lb::fuzzing::weights),
];

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("reading a fuzz input directory").path())
        .filter(|p| p.is_file() && p.file_name().is_none_or(|n| n != ".gitkeep"))
        .collect();
    out.sort();
    out
}

#[test]
fn fuzz_regressions_and_seeds_pass() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let fuzz = root.join("tests/fuzz");
    let examples = files(&root.join("deploy/examples"));
    assert!(!examples.is_empty(), "no example manifests found");
    let mut failed = Vec::new();
    let mut ran = 0;
    for (name, target) in TARGETS {
        let mut inputs = files(&fuzz.join("regressions").join(name));
        inputs.extend(files(&fuzz.join("seeds").join(name)));
        if !matches!(name, "codec" | "weights") {
            inputs.extend(examples.iter().cloned());
        }
        for path in inputs {
            let data = fs::read(&path).expect("reading a fuzz input");
            ran += 1;
            if catch_unwind(AssertUnwindSafe(|| target(&data))).is_err() {
                failed.push(format!("{name}: {}", path.display()));
            }
        }
    }
    assert!(failed.is_empty(), "fuzz inputs that fail: {failed:#?}");
    assert!(ran >= 3, "only {ran} inputs replayed");
}
