//! What of the build context is sent (wit/protocol.md §5.6): what the
//! Dockerfile's `COPY` and `ADD` can read when that is known before the
//! build, else all of it; either way without what `.dockerignore` leaves
//! out, read with Docker's semantics by the host that packs it
//! (`sandbox-exec.upload-directory`).

use super::dockerfile::{self, exec_form};

/// The context's ignore file, at its root.
pub const DOCKERIGNORE: &str = ".dockerignore";

/// The context paths the Dockerfile's `COPY` and `ADD` instructions read,
/// as BuildKit sends only what a build uses, when they are known before the
/// build: every source is a literal path inside the context. `None` (send
/// the whole context) when a source is `.`, holds a wildcard, a variable,
/// an escape or `..`, is a heredoc, or when a `RUN --mount` may read the
/// context. `COPY --from` and `ADD` of a URL read no context.
pub fn referenced_paths(dockerfile: &str) -> Option<Vec<String>> {
    let mut paths: Vec<String> = Vec::new();
    for ins in dockerfile::parse(dockerfile) {
        match ins.keyword.as_str() {
            "RUN" if ins.args.contains("--mount") => return None,
            "COPY" | "ADD" => {
                let mut rest = ins.args.trim_start();
                let mut from_elsewhere = false;
                while rest.starts_with("--") {
                    let (flag, after) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
                    from_elsewhere |= flag.starts_with("--from=");
                    rest = after.trim_start();
                }
                if from_elsewhere {
                    continue;
                }
                let mut words = match exec_form(rest) {
                    Some(list) => list,
                    None => rest.split_whitespace().map(str::to_owned).collect(),
                };
                words.pop(); // the destination
                for source in words {
                    if ins.keyword == "ADD"
                        && ["http://", "https://", "git@", "git://"].iter().any(|p| source.starts_with(p))
                    {
                        continue;
                    }
                    paths.push(literal_path(&source)?);
                }
            }
            _ => {}
        }
    }
    paths.sort();
    paths.dedup();
    Some(paths)
}

/// `source` as a clean context path, if it is a plain one.
fn literal_path(source: &str) -> Option<String> {
    if source.starts_with("<<") || source.contains(['*', '?', '[', '\\', '$', '"', '\'']) || source != source.trim() {
        return None;
    }
    let parts: Vec<&str> = source.split('/').filter(|p| !p.is_empty() && *p != ".").collect();
    // A part with blanks at its ends would be trimmed as a pattern, and `..` is the builder's to refuse.
    if parts.is_empty() || parts.iter().any(|p| *p == ".." || *p != p.trim()) {
        return None; // the whole context, or a path the builder refuses by name
    }
    Some(parts.join("/"))
}

/// The exclusions to send: with `only`, everything but those paths (and
/// what is below them); then the lines of `dockerignore` (`None`: the
/// context has none), which may leave out more; then exceptions that keep
/// `.dockerignore` and `Dockerfile` themselves, as Docker's CLI does. No
/// `only` and no `.dockerignore`: nothing is left out.
pub fn exclusions(dockerignore: Option<&str>, only: Option<&[String]>) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    if let Some(paths) = only {
        lines.push("**".to_owned());
        lines.extend(paths.iter().map(|path| format!("!{path}")));
    }
    if let Some(text) = dockerignore {
        // A byte-order mark is dropped here: the pattern reader drops it only from its first line.
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        lines.extend(text.lines().map(str::to_owned));
    }
    if !lines.is_empty() {
        lines.push(format!("!{DOCKERIGNORE}"));
        lines.push("!Dockerfile".to_owned());
    }
    lines
}

/// Whether sending only `paths` is safe given the context's symlinks: a
/// path that goes through a symlink (which COPY follows when it stays in
/// the context) needs its target too, so then the whole context is sent.
/// `is_symlink` answers for a context path.
pub fn through_no_symlink(paths: &[String], is_symlink: impl Fn(&str) -> bool) -> bool {
    paths.iter().all(|path| {
        let mut prefix = String::new();
        path.split('/').all(|part| {
            if !prefix.is_empty() {
                prefix.push('/');
            }
            prefix.push_str(part);
            !is_symlink(&prefix)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_dockerignore_nothing_is_left_out_and_with_one_it_keeps_itself_and_the_dockerfile() {
        assert!(exclusions(None, None).is_empty());
        assert_eq!(
            exclusions(Some("# deps\nnode_modules\r\n*\n"), None),
            ["# deps", "node_modules", "*", "!.dockerignore", "!Dockerfile"]
        );
    }

    #[test]
    fn only_the_literal_sources_of_copy_and_add_are_referenced() {
        let dockerfile = "FROM scratch AS build\nCOPY --chmod=755 app.py ./lib/ /srv/\nADD [\"data/a b.txt\", \"/d/\"]\n\
             ADD https://example.com/x.tar /x\nCOPY --from=build /out /out\nFROM scratch\nCOPY /app.py lib /again/\n\
             RUN echo hi\n";
        assert_eq!(referenced_paths(dockerfile), Some(vec!["app.py".into(), "data/a b.txt".into(), "lib".into()]));
        assert_eq!(referenced_paths("FROM scratch\nENV A=1\n"), Some(vec![]), "nothing is copied");
        for whole in [
            "COPY . /app/",
            "COPY ./ /app/",
            "COPY *.py /app/",
            "COPY src/[ab].txt /",
            "COPY $DIR /app/",
            "COPY ../secret /",
            "COPY [\"./ spaced\", \"/d/\"]",
            "COPY [\"dir/trailing \", \"/d/\"]",
            "COPY <<EOF /x\nhi\nEOF",
            "RUN --mount=type=bind,target=/src make",
        ] {
            assert_eq!(referenced_paths(&format!("FROM scratch\n{whole}\n")), None, "{whole}");
        }
    }

    #[test]
    fn narrowed_exclusions_keep_the_sources_and_still_apply_the_dockerignore() {
        let only = ["app.py".to_owned(), "lib".to_owned()];
        assert_eq!(
            exclusions(Some("lib/secret.key"), Some(&only)),
            ["**", "!app.py", "!lib", "lib/secret.key", "!.dockerignore", "!Dockerfile"]
        );
        assert_eq!(exclusions(None, Some(&[])), ["**", "!.dockerignore", "!Dockerfile"]);
        // A .dockerignore saved with a byte-order mark: its first pattern still reads as written.
        assert_eq!(
            exclusions(Some("\u{feff}lib/secret.key\n"), Some(&only))[3],
            "lib/secret.key",
            "the mark would hide the pattern once other lines come first"
        );
    }

    #[test]
    fn a_source_through_a_symlink_needs_the_whole_context() {
        let links = |path: &str| path == "current" || path == "app/link";
        assert!(through_no_symlink(&["app/main.py".into(), "lib".into()], links));
        assert!(!through_no_symlink(&["current/main.py".into()], links));
        assert!(!through_no_symlink(&["app/link".into()], links));
    }
}
