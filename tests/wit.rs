//! The WIT contracts in wit/ parse and declare the worlds the components use.

use wit_parser::Resolve;

#[test]
fn wit_package_declares_signer_and_builder_worlds() {
    let mut resolve = Resolve::default();
    let (package, _) = resolve.push_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/wit")).expect("wit/ parses");
    let worlds: Vec<&str> = resolve.packages[package].worlds.keys().map(String::as_str).collect();
    assert!(worlds.contains(&"signer") && worlds.contains(&"builder"), "{worlds:?}");
    let builder = resolve.select_world(&[package], Some("builder")).unwrap();
    let imports: Vec<String> = resolve.worlds[builder].imports.keys().map(|k| resolve.name_world_key(k)).collect();
    for wanted in ["snapsign:components/sandbox-exec@0.1.0", "snapsign:components/events@0.1.0"] {
        assert!(imports.iter().any(|i| i == wanted), "builder lacks {wanted}: {imports:?}");
    }
    let signer = resolve.select_world(&[package], Some("signer")).unwrap();
    assert!(resolve.worlds[signer].imports.is_empty(), "the signer world adds no imports of ours");
}
