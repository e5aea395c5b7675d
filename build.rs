//! Link settings of the guest components.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("CARGO_CFG_TARGET_ARCH").as_deref() == Ok("wasm32") {
        // The builder starts with room for a typical build's heap, so that its
        // memory does not grow: a grown memory is shrunk back with an
        // mprotect at the next instantiation in the same pool slot, a TLB
        // shootdown that costs as much as the rest of instantiation (docs/figures.md,
        // "Builder instantiation: where the time goes"). Untouched pages cost nothing resident.
        println!("cargo:rustc-link-arg-bin=snapsign-builder=--initial-memory={}", 4 << 20);
    }
}
