//! The shipped captures are exactly what the generator makes.

#[test]
fn shipped_captures_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("captures");
    for (name, bytes) in toa_examples::captures::all() {
        let shipped = std::fs::read(dir.join(name)).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            shipped == bytes,
            "examples/captures/{name} is stale: run `cargo run -p toa-examples --bin toa-captures`"
        );
    }
}
