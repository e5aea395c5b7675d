//! The rootfs tree being built (a directory on disk plus recorded owners) and
//! the build context COPY reads from. Sources never leave the context; paths
//! in the tree resolve symlinks as inside a chroot, so nothing is written
//! outside the tree either.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::plan::{Chown, CopyOp};

/// Numeric owner recorded for a tree entry (files on disk stay the builder's).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Owner {
    pub uid: u64,
    pub gid: u64,
}

/// The kind of a tree entry; nothing else is allowed in a snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// One entry of the tree, as the archive records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Path relative to the tree root, `/`-separated, no leading slash.
    pub rel: String,
    pub kind: Kind,
    /// Permission bits (`0o7777` mask).
    pub mode: u32,
    /// File size; 0 for directories and symlinks.
    pub size: u64,
    pub link: Option<String>,
    pub owner: Owner,
}

/// What one COPY did, for the build log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub notes: Vec<String>,
}

/// The build context: COPY sources resolve inside it or not at all.
#[derive(Debug, Clone)]
pub struct Context {
    root: PathBuf,
}

/// A COPY source found in the context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    /// Context-relative path as matched (`.` for the whole context).
    pub display: String,
    /// Last path component as matched: the name a file gets in a directory destination.
    pub name: String,
    /// The real path, symlinks resolved (inside the context).
    pub path: PathBuf,
}

impl Context {
    pub fn open(dir: &Path) -> Result<Context> {
        let root = fs::canonicalize(dir).with_context(|| format!("open the build context {}", dir.display()))?;
        if !root.is_dir() {
            bail!("the build context {} is not a directory", dir.display());
        }
        Ok(Context { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves one COPY source: `/` or no prefix both mean the context root,
    /// `..` may not climb out of it, `*`/`?`/`[…]` match within one component,
    /// and the real path (symlinks followed) must stay inside the context.
    pub fn resolve(&self, source: &str) -> Result<Vec<Source>> {
        let mut parts: Vec<&str> = Vec::new();
        for part in source.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    if parts.pop().is_none() {
                        bail!("source {source} is outside the build context (.. climbs above it)");
                    }
                }
                p => parts.push(p),
            }
        }
        let mut matches = vec![(self.root.clone(), Vec::<String>::new())];
        for part in &parts {
            let mut next = Vec::new();
            for (dir, rel) in matches {
                if is_pattern(part) {
                    let Ok(listing) = fs::read_dir(&dir) else { continue };
                    let mut names: Vec<String> =
                        listing.filter_map(|e| e.ok()?.file_name().into_string().ok()).collect();
                    names.sort();
                    for name in names.into_iter().filter(|n| glob_match(part, n)) {
                        let mut rel = rel.clone();
                        rel.push(name.clone());
                        next.push((dir.join(&name), rel));
                    }
                } else {
                    let mut rel = rel.clone();
                    rel.push((*part).to_owned());
                    next.push((dir.join(part), rel));
                }
            }
            matches = next;
        }
        let mut sources = Vec::new();
        for (path, rel) in matches {
            let display = if rel.is_empty() { ".".to_owned() } else { rel.join("/") };
            let real = match fs::canonicalize(&path) {
                Ok(real) => real,
                Err(_) if fs::symlink_metadata(&path).is_ok() => {
                    bail!("source {display} is a symlink that points to nothing in the build context")
                }
                Err(_) if parts.iter().any(|p| is_pattern(p)) => continue,
                Err(_) => bail!("source {display} does not exist in the build context"),
            };
            if !real.starts_with(&self.root) {
                bail!("source {display} resolves outside the build context (through a symlink); it is refused");
            }
            sources.push(Source { name: rel.last().cloned().unwrap_or_default(), display, path: real });
        }
        if sources.is_empty() {
            bail!("source {source} matches no file in the build context");
        }
        Ok(sources)
    }
}

fn is_pattern(part: &str) -> bool {
    part.contains(['*', '?', '['])
}

/// Shell-style match of one path component: `*`, `?`, `[abc]`, `[a-z]`, `[!x]`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    fn go(p: &[char], n: &[char]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some('*') => (0..=n.len()).any(|i| go(&p[1..], &n[i..])),
            Some('?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some('[') => {
                let Some(close) = p.iter().skip(2).position(|&c| c == ']').map(|i| i + 2) else {
                    return n.first() == Some(&'[') && go(&p[1..], &n[1..]);
                };
                let Some(&c) = n.first() else { return false };
                let (negate, set) = match p[1] {
                    '!' | '^' => (true, &p[2..close]),
                    _ => (false, &p[1..close]),
                };
                let mut hit = false;
                let mut i = 0;
                while i < set.len() {
                    if i + 2 < set.len() && set[i + 1] == '-' {
                        hit |= set[i] <= c && c <= set[i + 2];
                        i += 3;
                    } else {
                        hit |= set[i] == c;
                        i += 1;
                    }
                }
                hit != negate && go(&p[close + 1..], &n[1..])
            }
            Some(&c) => n.first() == Some(&c) && go(&p[1..], &n[1..]),
        }
    }
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    go(&p, &n)
}

/// ADD would unpack these in Docker; the reference builder refuses rather than copy them differently.
fn looks_like_archive(name: &str) -> bool {
    [".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// The rootfs being built.
#[derive(Debug)]
pub struct Tree {
    root: PathBuf,
    owners: BTreeMap<String, Owner>,
}

impl Tree {
    /// An empty tree at `root` (created).
    pub fn create(root: PathBuf) -> Result<Tree> {
        fs::create_dir_all(&root).with_context(|| format!("create the tree directory {}", root.display()))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", root.display()))?;
        Ok(Tree { root, owners: BTreeMap::new() })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The on-disk path of a tree-relative path.
    pub fn host(&self, rel: &str) -> PathBuf {
        if rel.is_empty() { self.root.clone() } else { self.root.join(rel) }
    }

    pub fn owner(&self, rel: &str) -> Owner {
        self.owners.get(rel).copied().unwrap_or_default()
    }

    pub fn set_owner(&mut self, rel: &str, owner: Owner) {
        if owner == Owner::default() {
            self.owners.remove(rel);
        } else {
            self.owners.insert(rel.to_owned(), owner);
        }
    }

    /// Resolves an absolute image path to a tree-relative one, following
    /// symlinks found in the tree as if the tree were `/` (absolute targets
    /// restart at the tree root, `..` stops there). The last component is
    /// followed only with `follow_last`.
    pub fn resolve(&self, image_path: &str, follow_last: bool) -> Result<String> {
        let mut pending: Vec<String> = image_path.split('/').rev().map(str::to_owned).collect();
        let mut resolved: Vec<String> = Vec::new();
        let mut links = 0;
        while let Some(part) = pending.pop() {
            match part.as_str() {
                "" | "." => continue,
                ".." => {
                    resolved.pop();
                    continue;
                }
                _ => {}
            }
            let mut candidate = resolved.clone();
            candidate.push(part.clone());
            let host = self.root.join(candidate.join("/"));
            let is_last = pending.iter().all(|p| p.is_empty() || p == ".");
            match fs::symlink_metadata(&host) {
                Ok(meta) if meta.file_type().is_symlink() && (follow_last || !is_last) => {
                    links += 1;
                    if links > 40 {
                        bail!("too many levels of symlinks resolving {image_path} in the tree");
                    }
                    let target = fs::read_link(&host).with_context(|| format!("read link {}", host.display()))?;
                    let target = target.to_str().ok_or_else(|| anyhow!("symlink {} is not UTF-8", host.display()))?;
                    if target.starts_with('/') {
                        resolved.clear();
                    }
                    pending.extend(target.split('/').rev().map(str::to_owned));
                }
                _ => resolved.push(part),
            }
        }
        Ok(resolved.join("/"))
    }

    /// `mkdir -p` inside the tree; new directories are 0755 and root-owned.
    pub fn make_dirs(&mut self, image_path: &str) -> Result<String> {
        let mut current = String::new();
        for part in image_path.split('/').filter(|p| !p.is_empty() && *p != ".") {
            let rel = self.resolve(&format!("/{current}/{part}"), true)?;
            let host = self.host(&rel);
            match fs::symlink_metadata(&host) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => bail!("/{rel} exists in the tree and is not a directory"),
                Err(_) => {
                    fs::DirBuilder::new().mode(0o755).create(&host).with_context(|| format!("mkdir /{rel}"))?;
                    fs::set_permissions(&host, fs::Permissions::from_mode(0o755))
                        .with_context(|| format!("chmod /{rel}"))?;
                }
            }
            current = rel;
        }
        Ok(current)
    }

    /// Carries out a COPY/ADD from the context.
    pub fn copy(&mut self, context: &Context, op: &CopyOp) -> Result<CopyStats> {
        let mut stats = CopyStats::default();
        let mut sources = Vec::new();
        for source in &op.sources {
            sources.extend(context.resolve(source)?);
        }
        let dest_exists_as_dir = fs::metadata(self.host(&self.resolve(&op.dest, true)?)).is_ok_and(|m| m.is_dir());
        let dest_is_dir = op.dest_is_dir || sources.len() > 1 || dest_exists_as_dir;
        let owner = match &op.chown {
            Some(chown) => self.lookup_owner(chown, &mut stats.notes),
            None => Owner::default(),
        };
        for source in &sources {
            let meta = fs::metadata(&source.path).with_context(|| format!("stat source {}", source.display))?;
            if meta.is_dir() {
                let existed = fs::symlink_metadata(self.host(&self.resolve(&op.dest, true)?)).is_ok();
                let rel = self.make_dirs(&op.dest)?;
                if !existed {
                    self.apply_meta(&rel, None, op.chmod, owner)?;
                }
                self.copy_dir(&source.path, &op.dest, op, owner, &mut stats)?;
            } else if meta.is_file() {
                if op.instruction == "ADD" && looks_like_archive(&source.name) {
                    bail!(
                        "ADD {}: unpacking local archives is not supported by the reference builder; \
                         use COPY to copy the file as it is",
                        source.display
                    );
                }
                let target = if dest_is_dir {
                    format!("{}/{}", op.dest.trim_end_matches('/'), source.name)
                } else {
                    op.dest.clone()
                };
                self.copy_file(&source.path, &target, op, owner, &mut stats)?;
            } else {
                bail!("source {} is not a regular file or a directory", source.display);
            }
        }
        Ok(stats)
    }

    fn copy_dir(&mut self, src: &Path, dest: &str, op: &CopyOp, owner: Owner, stats: &mut CopyStats) -> Result<()> {
        let mut children: Vec<_> = fs::read_dir(src)
            .with_context(|| format!("list {}", src.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("list {}", src.display()))?;
        children.sort_by_key(|e| e.file_name());
        for child in children {
            let name = child.file_name().into_string().map_err(|n| anyhow!("file name {n:?} is not UTF-8"))?;
            let path = child.path();
            let image_path = format!("{}/{name}", dest.trim_end_matches('/'));
            let kind = child.file_type().with_context(|| format!("stat {}", path.display()))?;
            if kind.is_dir() {
                let rel = self.make_dirs(&image_path)?;
                // Children first, so a read-only source directory is still writable while filled.
                self.copy_dir(&path, &image_path, op, owner, stats)?;
                let mode = fs::metadata(&path)?.permissions().mode();
                self.apply_meta(&rel, Some(mode), op.chmod, owner)?;
                stats.dirs += 1;
            } else if kind.is_file() {
                self.copy_file(&path, &image_path, op, owner, stats)?;
            } else if kind.is_symlink() {
                // Copied as a link and never followed, so it cannot reach outside the context.
                let target = fs::read_link(&path).with_context(|| format!("read link {}", path.display()))?;
                let rel = self.replaceable(&image_path)?;
                symlink(&target, self.host(&rel)).with_context(|| format!("create symlink /{rel}"))?;
                self.set_owner(&rel, owner);
                stats.symlinks += 1;
            } else {
                stats.notes.push(format!("skipped {}: not a file, directory or symlink", path.display()));
            }
        }
        Ok(())
    }

    fn copy_file(
        &mut self,
        src: &Path,
        image_path: &str,
        op: &CopyOp,
        owner: Owner,
        stats: &mut CopyStats,
    ) -> Result<()> {
        let rel = self.replaceable(image_path)?;
        let host = self.host(&rel);
        let bytes = fs::copy(src, &host).with_context(|| format!("copy {} to /{rel}", src.display()))?;
        let mode = fs::metadata(src)?.permissions().mode();
        self.apply_meta(&rel, Some(mode), op.chmod, owner)?;
        stats.files += 1;
        stats.bytes += bytes;
        Ok(())
    }

    /// Makes the parents of `image_path` and clears a file or link already there.
    fn replaceable(&mut self, image_path: &str) -> Result<String> {
        let (parent, name) = image_path.trim_end_matches('/').rsplit_once('/').unwrap_or(("", image_path));
        if name.is_empty() {
            bail!("cannot write a file at the image root");
        }
        let parent_rel = self.make_dirs(parent)?;
        let rel = if parent_rel.is_empty() { name.to_owned() } else { format!("{parent_rel}/{name}") };
        let host = self.host(&rel);
        match fs::symlink_metadata(&host) {
            Ok(meta) if meta.is_dir() => bail!("cannot replace the directory /{rel} with a file"),
            Ok(_) => fs::remove_file(&host).with_context(|| format!("replace /{rel}"))?,
            Err(_) => {}
        }
        Ok(rel)
    }

    fn apply_meta(&mut self, rel: &str, source_mode: Option<u32>, chmod: Option<u32>, owner: Owner) -> Result<()> {
        if let Some(mode) = chmod.or(source_mode) {
            fs::set_permissions(self.host(rel), fs::Permissions::from_mode(mode & 0o7777))
                .with_context(|| format!("chmod /{rel}"))?;
        }
        self.set_owner(rel, owner);
        Ok(())
    }

    /// `--chown`: ids as given, names from the tree's /etc/passwd and /etc/group.
    /// A user without a group gets the same number as gid, as Docker does.
    fn lookup_owner(&self, chown: &Chown, notes: &mut Vec<String>) -> Owner {
        let lookup = |file: &str, name: &str, field: usize| -> Option<(u64, Option<u64>)> {
            let rel = self.resolve(file, true).ok()?;
            let text = fs::read_to_string(self.host(&rel)).ok()?;
            text.lines().find_map(|line| {
                let cols: Vec<&str> = line.split(':').collect();
                if cols.first() != Some(&name) {
                    return None;
                }
                Some((cols.get(field)?.parse().ok()?, cols.get(3).and_then(|g| g.parse().ok())))
            })
        };
        let (uid, primary) = match chown.user.parse::<u64>() {
            Ok(uid) => (uid, None),
            Err(_) => match lookup("/etc/passwd", &chown.user, 2) {
                Some((uid, gid)) => (uid, gid),
                None => {
                    notes.push(format!(
                        "--chown={}: user not found in the image's /etc/passwd; the files stay owned by 0:0",
                        chown.user
                    ));
                    return Owner::default();
                }
            },
        };
        let gid = match &chown.group {
            None => primary.unwrap_or(uid),
            Some(group) => match group.parse::<u64>() {
                Ok(gid) => gid,
                Err(_) => match lookup("/etc/group", group, 2) {
                    Some((gid, _)) => gid,
                    None => {
                        notes.push(format!(
                            "--chown=…:{group}: group not found in the image's /etc/group; the files stay owned by 0:0"
                        ));
                        return Owner::default();
                    }
                },
            },
        };
        Owner { uid, gid }
    }

    /// Every entry, depth first, children sorted by name (directories before their contents).
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        self.walk(&self.root, "", &mut out)?;
        Ok(out)
    }

    fn walk(&self, dir: &Path, prefix: &str, out: &mut Vec<Entry>) -> Result<()> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .with_context(|| format!("list {}", dir.display()))?
            .map(|e| {
                e.map_err(anyhow::Error::from)?.file_name().into_string().map_err(|n| anyhow!("{n:?} is not UTF-8"))
            })
            .collect::<Result<_>>()?;
        names.sort();
        for name in names {
            let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
            let path = dir.join(&name);
            let meta = fs::symlink_metadata(&path).with_context(|| format!("stat {}", path.display()))?;
            let mode = meta.permissions().mode() & 0o7777;
            let owner = self.owner(&rel);
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path)?;
                let link = target.to_str().ok_or_else(|| anyhow!("symlink /{rel} is not UTF-8"))?.to_owned();
                out.push(Entry { rel, kind: Kind::Symlink, mode, size: 0, link: Some(link), owner });
            } else if meta.is_dir() {
                out.push(Entry { rel: rel.clone(), kind: Kind::Dir, mode, size: 0, link: None, owner });
                self.walk(&path, &rel, out)?;
            } else if meta.is_file() {
                out.push(Entry { rel, kind: Kind::File, mode, size: meta.len(), link: None, owner });
            }
        }
        Ok(())
    }

    /// Creates the missing parents of `rel` (0755) and fails if an existing
    /// one is not a real directory (a symlink included), so writing `rel`
    /// cannot land outside the tree.
    pub fn ensure_parent_dirs(&self, rel: &str) -> Result<()> {
        let mut path = self.root.clone();
        let parts: Vec<&str> = rel.split('/').collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            path.push(part);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => bail!("{rel} is below {}, which is not a directory", path.display()),
                Err(_) => fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&path)
                    .with_context(|| format!("mkdir {}", path.display()))?,
            }
        }
        Ok(())
    }
}

/// True when `rel` is a plain relative path: `/`-separated names, none empty, `.` or `..`.
pub fn is_plain_relative(rel: &str) -> bool {
    !rel.is_empty() && rel.split('/').all(|p| !p.is_empty() && p != "." && p != "..")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn op(sources: &[&str], dest: &str, dest_is_dir: bool) -> CopyOp {
        CopyOp {
            instruction: "COPY",
            line: 2,
            sources: sources.iter().map(|s| s.to_string()).collect(),
            dest: dest.into(),
            dest_is_dir,
            chmod: None,
            chown: None,
        }
    }

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    fn setup() -> (tempfile::TempDir, Context, Tree) {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("context");
        write(&ctx.join("app/main.py"), "print(1)\n");
        write(&ctx.join("app/lib/util.py"), "x = 1\n");
        write(&ctx.join("README.md"), "readme\n");
        write(&ctx.join("a.txt"), "a\n");
        write(&ctx.join("b.txt"), "bb\n");
        write(&dir.path().join("secret"), "top secret\n");
        let context = Context::open(&ctx).unwrap();
        let tree = Tree::create(dir.path().join("tree")).unwrap();
        (dir, context, tree)
    }

    fn read(tree: &Tree, image_path: &str) -> String {
        fs::read_to_string(tree.host(image_path.trim_start_matches('/'))).unwrap()
    }

    #[test]
    fn sources_may_not_escape_the_context() {
        let (dir, context, _) = setup();
        let err = context.resolve("../secret").unwrap_err().to_string();
        assert!(err.contains("outside the build context"), "{err}");
        let err = context.resolve("app/../../secret").unwrap_err().to_string();
        assert!(err.contains("outside the build context"), "{err}");
        symlink(dir.path().join("secret"), context.root().join("leak")).unwrap();
        let err = context.resolve("leak").unwrap_err().to_string();
        assert!(err.contains("resolves outside the build context"), "{err}");
        symlink("/etc", context.root().join("etc-link")).unwrap();
        assert!(context.resolve("etc-link/passwd").unwrap_err().to_string().contains("outside"));
        // An absolute source means the context root, as in Docker.
        assert_eq!(context.resolve("/a.txt").unwrap()[0].path, context.root().join("a.txt"));
        // A symlink that stays inside is followed.
        symlink("app/main.py", context.root().join("main-link")).unwrap();
        assert_eq!(context.resolve("main-link").unwrap()[0].path, context.root().join("app/main.py"));
        let err = context.resolve("missing.txt").unwrap_err().to_string();
        assert!(err.contains("does not exist in the build context"), "{err}");
    }

    #[test]
    fn globs_expand_within_a_component() {
        let (_dir, context, _) = setup();
        let names: Vec<String> = context.resolve("*.txt").unwrap().into_iter().map(|s| s.display).collect();
        assert_eq!(names, ["a.txt", "b.txt"]);
        assert!(context.resolve("*.rs").unwrap_err().to_string().contains("matches no file"));
        assert!(glob_match("[a-c]?.t*", "b1.txt"));
        assert!(!glob_match("[!a]*", "abc"));
        assert!(glob_match("*", ".hidden"));
    }

    #[test]
    fn copy_follows_docker_destination_rules() {
        let (_dir, context, mut tree) = setup();
        // Directory source: its contents land in dest.
        tree.copy(&context, &op(&["app"], "/srv", false)).unwrap();
        assert_eq!(read(&tree, "/srv/main.py"), "print(1)\n");
        assert_eq!(read(&tree, "/srv/lib/util.py"), "x = 1\n");
        // File to a path not ending in / : that path is the file.
        tree.copy(&context, &op(&["README.md"], "/docs/readme", false)).unwrap();
        assert_eq!(read(&tree, "/docs/readme"), "readme\n");
        // File into an existing directory or a dir destination keeps its name.
        tree.copy(&context, &op(&["a.txt"], "/srv", false)).unwrap();
        assert_eq!(read(&tree, "/srv/a.txt"), "a\n");
        tree.copy(&context, &op(&["a.txt"], "/new", true)).unwrap();
        assert_eq!(read(&tree, "/new/a.txt"), "a\n");
        // Several sources mean a directory.
        let stats = tree.copy(&context, &op(&["*.txt"], "/many", false)).unwrap();
        assert_eq!((stats.files, stats.bytes), (2, 5));
        assert_eq!(read(&tree, "/many/b.txt"), "bb\n");
        // Overwriting a file replaces it.
        tree.copy(&context, &op(&["b.txt"], "/docs/readme", false)).unwrap();
        assert_eq!(read(&tree, "/docs/readme"), "bb\n");
        let stats = tree.copy(&context, &op(&["a.txt"], "/srv/lib", false)).unwrap();
        assert_eq!(stats.files, 1, "an existing directory destination receives the file");
        assert_eq!(read(&tree, "/srv/lib/a.txt"), "a\n");
    }

    #[test]
    fn chmod_applies_and_chown_is_recorded() {
        let (_dir, context, mut tree) = setup();
        write(&tree.host("etc/passwd"), "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n");
        let mut copy = op(&["app"], "/srv", false);
        copy.chmod = Some(0o700);
        copy.chown = Some(Chown { user: "app".into(), group: None });
        tree.copy(&context, &copy).unwrap();
        let mode = fs::metadata(tree.host("srv/main.py")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        assert_eq!(tree.owner("srv/main.py"), Owner { uid: 1000, gid: 1001 });
        assert_eq!(tree.owner("srv/lib"), Owner { uid: 1000, gid: 1001 });
        let mut copy = op(&["a.txt"], "/x", false);
        copy.chown = Some(Chown { user: "7".into(), group: None });
        tree.copy(&context, &copy).unwrap();
        assert_eq!(tree.owner("x"), Owner { uid: 7, gid: 7 });
        let mut copy = op(&["a.txt"], "/y", false);
        copy.chown = Some(Chown { user: "nobody-here".into(), group: None });
        let stats = tree.copy(&context, &copy).unwrap();
        assert_eq!(tree.owner("y"), Owner::default());
        assert!(stats.notes[0].contains("user not found"), "{:?}", stats.notes);
    }

    #[test]
    fn tree_symlinks_resolve_inside_the_tree() {
        let (_dir, context, mut tree) = setup();
        tree.make_dirs("/usr/bin").unwrap();
        symlink("/usr/bin", tree.host("bin")).unwrap();
        symlink("../../../../..", tree.host("usr/up")).unwrap();
        tree.copy(&context, &op(&["a.txt"], "/bin/", true)).unwrap();
        assert_eq!(read(&tree, "/usr/bin/a.txt"), "a\n");
        assert_eq!(tree.resolve("/usr/up/etc", true).unwrap(), "etc");
        tree.copy(&context, &op(&["a.txt"], "/usr/up/escaped", false)).unwrap();
        assert!(tree.host("escaped").is_file(), "writes through a climbing symlink stay in the tree");
    }

    #[test]
    fn nested_symlinks_are_copied_as_links() {
        let (_dir, context, mut tree) = setup();
        symlink("/etc/shadow", context.root().join("app/shadow")).unwrap();
        let stats = tree.copy(&context, &op(&["app"], "/srv", false)).unwrap();
        assert_eq!(stats.symlinks, 1);
        assert_eq!(fs::read_link(tree.host("srv/shadow")).unwrap(), Path::new("/etc/shadow"));
    }

    #[test]
    fn add_refuses_local_archives() {
        let (_dir, context, mut tree) = setup();
        write(&context.root().join("x.tar.gz"), "not really");
        let mut add = op(&["x.tar.gz"], "/x", false);
        add.instruction = "ADD";
        let err = tree.copy(&context, &add).unwrap_err().to_string();
        assert!(err.contains("unpacking local archives is not supported"), "{err}");
        let copy = op(&["x.tar.gz"], "/x", false);
        tree.copy(&context, &copy).unwrap();
    }

    #[test]
    fn entries_are_sorted_depth_first() {
        let (_dir, context, mut tree) = setup();
        tree.copy(&context, &op(&["."], "/", false)).unwrap();
        let rels: Vec<String> = tree.entries().unwrap().into_iter().map(|e| e.rel).collect();
        assert_eq!(rels, ["README.md", "a.txt", "app", "app/lib", "app/lib/util.py", "app/main.py", "b.txt"]);
    }

    #[test]
    fn plain_relative_paths() {
        assert!(is_plain_relative("usr/bin/x"));
        assert!(!is_plain_relative("../x"));
        assert!(!is_plain_relative("/x"));
        assert!(!is_plain_relative("a/./b"));
        assert!(!is_plain_relative("a//b"));
        assert!(!is_plain_relative(""));
    }
}
