//! Compiles the eBPF programs' option parsers (the very headers the BPF
//! objects are built from) for the host, with the system's C compiler.

fn main() {
    let shim = "../toa-server-shim/bpf";
    let lb = "../toa-lb-injector/bpf";
    for path in [
        "c/shim.c",
        "c/lb.c",
        "c/host.h",
        &format!("{shim}/find_toa.h"),
        &format!("{shim}/find_uoa.h"),
        &format!("{lb}/options.h"),
    ] {
        println!("cargo:rerun-if-changed={path}");
    }
    cc::Build::new()
        .file("c/shim.c")
        .file("c/lb.c")
        .include("c")
        .include(shim)
        .include(lb)
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .compile("toa_bpf_parity");
}
