//! docs/architecture.md names exactly the workspace's crates, with their
//! paths: the crate table stays true when a crate is added, moved or removed.

use std::path::Path;

/// `(package name, path)` of every workspace member, from the manifests.
fn members() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    // `members = [ ... ]`, on one line or several.
    let start = manifest.find("\nmembers").expect("a members list in Cargo.toml");
    let list = manifest[start..].split_once('[').and_then(|(_, rest)| rest.split_once(']')).expect("members = [...]").0;
    list.split(',')
        .map(|m| m.trim().trim_matches('"'))
        .map(|m| m.trim_end_matches('/'))
        .filter(|m| !m.is_empty())
        .map(|path| {
            let text = std::fs::read_to_string(root.join(path).join("Cargo.toml")).unwrap();
            let name = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("name = \"").and_then(|v| v.strip_suffix('"')))
                .unwrap_or_else(|| panic!("{path}/Cargo.toml names no package"));
            let path = if path == "." { ".".to_owned() } else { format!("{path}/") };
            (name.to_owned(), path)
        })
        .collect()
}

#[test]
fn the_architecture_document_names_exactly_the_workspace_crates() {
    let doc = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/architecture.md")).unwrap();
    // The crate table: rows `| `name` | `path` | what |`.
    let rows: Vec<(String, String)> = doc
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let (name, path) = (cells.get(1)?, cells.get(2)?);
            let name = name.strip_prefix('`')?.strip_suffix('`')?;
            let path = path.strip_prefix('`')?.strip_suffix('`')?;
            name.starts_with("snapsign").then(|| (name.to_owned(), path.to_owned()))
        })
        .collect();
    let mut expected = members();
    let mut named = rows.clone();
    expected.sort();
    named.sort();
    assert_eq!(named, expected, "docs/architecture.md's crate table against Cargo.toml's members");
    let words = ["no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"];
    let count = words.get(expected.len()).map_or_else(|| expected.len().to_string(), |w| (*w).to_owned());
    assert!(doc.contains(&format!("has {count} crates")), "the document says how many crates there are ({count})");
}
