//! Writes the sample captures (`examples/captures/`), or checks them with `--check`.

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut check = false;
    let mut dir = PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/captures"));
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            "-h" | "--help" => {
                println!(
                    "usage: toa-captures [--check] [DIR]\nwrites (or checks) the sample captures in DIR (default: examples/captures)"
                );
                return ExitCode::SUCCESS;
            }
            other => dir = PathBuf::from(other),
        }
    }
    let mut stale = 0;
    for (name, bytes) in toa_examples::captures::all() {
        let path = dir.join(name);
        if check {
            if std::fs::read(&path).ok().as_deref() != Some(&bytes[..]) {
                eprintln!("{} is stale: run `cargo run -p toa-examples --bin toa-captures`", path.display());
                stale += 1;
            }
        } else if let Err(e) = std::fs::write(&path, &bytes) {
            eprintln!("cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        } else {
            println!("wrote {} ({} bytes)", path.display(), bytes.len());
        }
    }
    if stale > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS }
}
