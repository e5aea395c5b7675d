//! The rootfs tree being built: a directory on disk plus recorded owners.
//! Paths in the tree resolve symlinks as inside a chroot, so nothing is
//! written outside the tree. COPY/ADD into it is in [`copy`], `--chown`
//! name lookups in [`chown`]; the build context COPY reads from is
//! [`crate::context`].

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};

mod chown;
mod copy;

pub use chown::Identity;
pub use copy::CopyStats;

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

/// The rootfs being built.
///
/// Owners are recorded beside the files until the first RUN
/// ([`Tree::own_on_disk`]); from then on the files on disk carry them, so a
/// step sees (and may change) the owners the image gives, and the archive
/// reads them back.
#[derive(Debug)]
pub struct Tree {
    root: PathBuf,
    owners: BTreeMap<String, Owner>,
    /// Set once owners live on disk: the builder's own (uid, gid), which the image calls 0:0.
    on_disk: Option<(u32, u32)>,
}

impl Tree {
    /// An empty tree at `root` (created).
    pub fn create(root: PathBuf) -> Result<Tree> {
        fs::create_dir_all(&root).with_context(|| format!("create the tree directory {}", root.display()))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("chmod {}", root.display()))?;
        // Canonical, so paths a Context resolves under it map back to tree paths.
        let root = fs::canonicalize(&root).with_context(|| format!("resolve {}", root.display()))?;
        Ok(Tree { root, owners: BTreeMap::new(), on_disk: None })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The on-disk path of a tree-relative path.
    pub fn host(&self, rel: &str) -> PathBuf {
        if rel.is_empty() { self.root.clone() } else { self.root.join(rel) }
    }

    /// The owner of the entry at `host` (a path under this tree's root).
    pub fn owner_at(&self, host: &Path) -> Owner {
        match host.strip_prefix(&self.root) {
            Ok(rel) => self.owner(&rel.to_string_lossy()),
            Err(_) => Owner::default(),
        }
    }

    /// A `COPY --from` source (an absolute path in this image, maybe with a
    /// pattern in its last part) as a path relative to the root, symlinks
    /// before the last part resolved inside the tree, so that nothing outside it is named.
    pub fn resolve_pattern(&self, source: &str) -> Result<String> {
        let trimmed = source.trim_end_matches('/');
        let (dir, last) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
        let has_pattern = |s: &str| s.contains(['*', '?', '[']);
        if has_pattern(dir) {
            bail!("COPY --from source {source}: a pattern is only supported in the last part of the path");
        }
        let rel = if has_pattern(last) || last.is_empty() {
            let dir = self.resolve(dir, true)?;
            if dir.is_empty() { last.to_owned() } else { format!("{dir}/{last}") }
        } else {
            self.resolve(trimmed, true)?
        };
        Ok(if rel.is_empty() { ".".to_owned() } else { rel })
    }

    pub fn owner(&self, rel: &str) -> Owner {
        match self.on_disk {
            Some(_) => fs::symlink_metadata(self.host(rel)).map(|m| self.image_owner(&m)).unwrap_or_default(),
            None => self.owners.get(rel).copied().unwrap_or_default(),
        }
    }

    pub fn set_owner(&mut self, rel: &str, owner: Owner) -> Result<()> {
        if self.on_disk.is_some() {
            return self.chown_on_disk(rel, owner);
        }
        if owner == Owner::default() {
            self.owners.remove(rel);
        } else {
            self.owners.insert(rel.to_owned(), owner);
        }
        Ok(())
    }

    /// From now on the files carry their owners: the recorded ones are given
    /// to the files (`lchown`), as the builder's uid maps them. Called before
    /// the first RUN. Fails, naming the file and the owner, where this
    /// builder cannot give that owner (a user namespace mapping one uid).
    pub fn own_on_disk(&mut self) -> Result<()> {
        if self.on_disk.is_some() {
            return Ok(());
        }
        // SAFETY: geteuid/getegid cannot fail.
        self.on_disk = Some(unsafe { (libc::geteuid(), libc::getegid()) });
        for (rel, owner) in std::mem::take(&mut self.owners) {
            self.chown_on_disk(&rel, owner)?;
        }
        Ok(())
    }

    fn chown_on_disk(&self, rel: &str, owner: Owner) -> Result<()> {
        let (me_uid, me_gid) = self.on_disk.expect("owners are on disk");
        let disk = |id: u64, me: u32| if id == 0 { Some(me) } else { u32::try_from(id).ok() };
        let (Some(uid), Some(gid)) = (disk(owner.uid, me_uid), disk(owner.gid, me_gid)) else {
            bail!("/{rel} is owned by {}:{}, which is out of range", owner.uid, owner.gid);
        };
        std::os::unix::fs::lchown(self.host(rel), Some(uid), Some(gid)).with_context(|| {
            format!(
                "give /{rel} its owner {}:{} before RUN (this builder runs as uid {me_uid}; an owner other than \
                 root needs the builder to be root of a sandbox with a uid range)",
                owner.uid, owner.gid
            )
        })
    }

    /// The owner of a file on disk as the image says it (the builder's uid is 0).
    fn image_owner(&self, meta: &fs::Metadata) -> Owner {
        use std::os::unix::fs::MetadataExt;
        let (me_uid, me_gid) = self.on_disk.unwrap_or((0, 0));
        let id = |disk: u32, me: u32| if disk == me { 0 } else { u64::from(disk) };
        Owner { uid: id(meta.uid(), me_uid), gid: id(meta.gid(), me_gid) }
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

    /// Deletes `rel` (and what is below it), wherever it is; nothing when absent.
    pub fn remove(&mut self, rel: &str) -> Result<()> {
        let host = self.host(rel);
        match fs::symlink_metadata(&host) {
            Err(_) => return Ok(()),
            Ok(meta) if meta.is_dir() => {
                open_up(&host);
                fs::remove_dir_all(&host)
            }
            Ok(_) => fs::remove_file(&host),
        }
        .with_context(|| format!("delete /{rel}"))?;
        let below = format!("{rel}/");
        self.owners.retain(|k, _| k != rel && !k.starts_with(&below));
        Ok(())
    }

    /// Every entry, depth first, children sorted by name (directories before
    /// their contents). Sockets, fifos and device nodes (which a RUN step may
    /// leave) are not kept: [`Tree::specials`] names them.
    pub fn entries(&self) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        self.walk(&self.root, "", &mut out, &mut Vec::new())?;
        Ok(out)
    }

    /// The paths of entries a snapshot cannot hold (sockets, fifos, devices).
    pub fn specials(&self) -> Result<Vec<String>> {
        let mut specials = Vec::new();
        self.walk(&self.root, "", &mut Vec::new(), &mut specials)?;
        Ok(specials)
    }

    fn walk(&self, dir: &Path, prefix: &str, out: &mut Vec<Entry>, specials: &mut Vec<String>) -> Result<()> {
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
            let owner = match self.on_disk {
                Some(_) => self.image_owner(&meta),
                None => self.owner(&rel),
            };
            if meta.file_type().is_symlink() {
                let target = fs::read_link(&path)?;
                let link = target.to_str().ok_or_else(|| anyhow!("symlink /{rel} is not UTF-8"))?.to_owned();
                out.push(Entry { rel, kind: Kind::Symlink, mode, size: 0, link: Some(link), owner });
            } else if meta.is_dir() {
                out.push(Entry { rel: rel.clone(), kind: Kind::Dir, mode, size: 0, link: None, owner });
                self.walk(&path, &rel, out, specials)?;
            } else if meta.is_file() {
                out.push(Entry { rel, kind: Kind::File, mode, size: meta.len(), link: None, owner });
            } else {
                specials.push(rel);
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

/// Makes the directories at and below `path` writable (0755), so they can be removed.
pub(crate) fn open_up(path: &Path) {
    if let Ok(meta) = fs::symlink_metadata(path)
        && meta.is_dir()
    {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(0o755));
        if let Ok(children) = fs::read_dir(path) {
            children.flatten().for_each(|c| open_up(&c.path()));
        }
    }
}

/// `rm -rf`, first making read-only directories (copied from the context) writable.
pub(crate) fn remove_tree(path: &Path) {
    open_up(path);
    let _ = fs::remove_dir_all(path);
}

#[cfg(test)]
mod tests {
    use super::*;

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
