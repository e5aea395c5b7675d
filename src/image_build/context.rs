//! What of the build context is sent (wit/protocol.md §5.6): all of it but
//! what `.dockerignore` leaves out, read with Docker's semantics by the host
//! that packs it (`sandbox-exec.upload-directory`).

/// The context's ignore file, at its root.
pub const DOCKERIGNORE: &str = ".dockerignore";

/// The exclusions to send for a context whose `.dockerignore` holds
/// `dockerignore` (`None`: it has none, and everything is sent): its lines,
/// then exceptions that keep `.dockerignore` and `Dockerfile` themselves in
/// the context, as Docker's CLI does.
pub fn exclusions(dockerignore: Option<&str>) -> Vec<String> {
    let Some(text) = dockerignore else { return Vec::new() };
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    lines.push(format!("!{DOCKERIGNORE}"));
    lines.push("!Dockerfile".to_owned());
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_dockerignore_nothing_is_left_out_and_with_one_it_keeps_itself_and_the_dockerfile() {
        assert!(exclusions(None).is_empty());
        assert_eq!(
            exclusions(Some("# deps\nnode_modules\r\n*\n")),
            ["# deps", "node_modules", "*", "!.dockerignore", "!Dockerfile"]
        );
    }
}
