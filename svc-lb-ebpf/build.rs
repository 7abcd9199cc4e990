// Rebuild the eBPF object when bpf-linker changes: it is the linker, yet cargo does not
// track it as an input.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
