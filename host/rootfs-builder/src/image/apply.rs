//! Laying an image's layers into a [`Tree`], bottom first, with the OCI
//! whiteout rules:
//! - `dir/.wh.<name>` deletes `dir/<name>` (and what is below it) of the
//!   layers underneath; `dir/.wh..wh..opq` empties `dir` of what the layers
//!   underneath put there. Whiteouts never hide what their own layer adds.
//! - Regular files, directories, symlinks and hard links (to a path already
//!   in the tree: linked inside the tree) are written with their mode bits;
//!   owners go to [`Tree::set_owner`]. An entry replaces what was at its path
//!   (a directory is merged with a directory). Device nodes and fifos are
//!   skipped and counted.
//!
//! Hostile layers: a leading `/` is dropped, a `..` component is refused,
//! nothing is written (or deleted) through a symlink: an entry whose parent
//! in the tree is a symlink is refused. Files are created with `O_EXCL`, so
//! the last component is never followed either. An entry over
//! [`ApplyLimits::max_entry_bytes`], or files adding up to more than
//! [`ApplyLimits::max_total_bytes`], fail the apply. Layers are streamed
//! (gzip, zstd or plain tar, by their magic bytes), never read whole; each
//! is checked against the config's `rootfs.diff_ids` as it is read.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, symlink};

use anyhow::{Context as _, Result, anyhow, bail};
use sha2::{Digest, Sha256};
use tar::EntryType;

use super::Image;
use super::source;
use crate::archive::WHITEOUT_PREFIX;
use crate::tree::{Owner, Tree};

/// The opaque-directory marker.
const OPAQUE: &str = ".wh..wh..opq";

/// Size limits for an apply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApplyLimits {
    /// Largest single file.
    pub max_entry_bytes: u64,
    /// Largest total of file bytes written, all layers together.
    pub max_total_bytes: u64,
}

impl Default for ApplyLimits {
    fn default() -> Self {
        ApplyLimits { max_entry_bytes: 4 << 30, max_total_bytes: 32 << 30 }
    }
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApplyStats {
    pub layers: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub hard_links: u64,
    /// `.wh.<name>` entries that deleted something.
    pub whiteouts: u64,
    pub opaque_dirs: u64,
    /// Device nodes and fifos, not written.
    pub skipped_specials: u64,
    /// Bytes of regular files written.
    pub bytes: u64,
    /// Things the user may want to know (the specials skipped, by path).
    pub notes: Vec<String>,
}

pub(super) fn apply_layers(image: &Image, tree: &mut Tree, limits: &ApplyLimits) -> Result<ApplyStats> {
    let mut run = Apply { tree, limits, stats: ApplyStats::default(), dir_modes: BTreeMap::new() };
    for index in 0..image.layers.len() {
        let what = image.layers[index].describe(index);
        run.layer(image, index).with_context(|| format!("apply {what} of {}", image.location()))?;
        run.stats.layers += 1;
    }
    // Directory modes last, deepest first, so read-only directories were writable while filled.
    for (rel, mode) in run.dir_modes.iter().rev() {
        if literal(run.tree, rel).is_some_and(|m| m.is_dir()) {
            fs::set_permissions(run.tree.host(rel), fs::Permissions::from_mode(*mode))
                .with_context(|| format!("chmod /{rel}"))?;
        }
    }
    if run.stats.skipped_specials > 0 {
        run.stats.notes.push(format!(
            "skipped {} device node(s) and fifo(s): a snapshot holds only files, directories and symlinks",
            run.stats.skipped_specials
        ));
    }
    Ok(run.stats)
}

struct Apply<'a> {
    tree: &'a mut Tree,
    limits: &'a ApplyLimits,
    stats: ApplyStats,
    /// Final modes of the directories entries named.
    dir_modes: BTreeMap<String, u32>,
}

/// What the current layer added: whiteouts do not hide these.
#[derive(Default)]
struct Added {
    paths: HashSet<String>,
    /// Every parent of an added path.
    parents: HashSet<String>,
}

impl Added {
    fn insert(&mut self, rel: &str) {
        self.paths.insert(rel.to_owned());
        let mut rest = rel;
        while let Some((parent, _)) = rest.rsplit_once('/') {
            if !self.parents.insert(parent.to_owned()) {
                break;
            }
            rest = parent;
        }
    }

    fn contains(&self, rel: &str) -> bool {
        self.paths.contains(rel) || self.parents.contains(rel)
    }
}

/// A reader that hashes what passes through.
struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

/// The metadata of `rel` when every parent is a real directory (no symlink
/// on the way), else `None`; the last component is not followed.
fn literal(tree: &Tree, rel: &str) -> Option<Metadata> {
    let mut path = tree.root().to_owned();
    let parts: Vec<&str> = rel.split('/').collect();
    for part in &parts[..parts.len() - 1] {
        path.push(part);
        if !fs::symlink_metadata(&path).ok()?.is_dir() {
            return None;
        }
    }
    fs::symlink_metadata(tree.host(rel)).ok()
}

/// A tar entry's path made relative: `/` and `./` prefixes dropped; `..` refused.
fn entry_rel(name: &str) -> Result<Option<String>> {
    if name.split('/').any(|p| p == "..") {
        bail!("entry {name} has a .. component; refused");
    }
    Ok(source::normalise(name))
}

/// A numeric header field; an empty one (all NUL or spaces) is 0, as Go's
/// archive/tar (Docker's) reads it.
fn numeric(value: io::Result<u64>, raw: &[u8], name: &str) -> Result<u64> {
    match value {
        Ok(value) => Ok(value),
        Err(_) if raw.iter().all(|b| *b == 0 || *b == b' ') => Ok(0),
        Err(e) => Err(anyhow!("entry {name}: {e}")),
    }
}

fn bad_tar(e: io::Error) -> anyhow::Error {
    anyhow!("not a valid tar stream: {e}")
}

impl Apply<'_> {
    fn layer(&mut self, image: &Image, index: usize) -> Result<()> {
        let raw = image.open_layer(index)?;
        let (_, reader) = source::decompressed(raw)?;
        let mut archive = tar::Archive::new(HashingReader { inner: reader, hasher: Sha256::new() });
        let mut added = Added::default();
        for entry in archive.entries().map_err(bad_tar)? {
            let mut entry = entry.map_err(bad_tar)?;
            let name = entry.path().map_err(bad_tar)?;
            let name = name.to_str().ok_or_else(|| anyhow!("entry {} is not UTF-8", name.display()))?.to_owned();
            let kind = entry.header().entry_type();
            if kind == EntryType::XGlobalHeader {
                continue;
            }
            let Some(rel) = entry_rel(&name)? else { continue }; // the root itself
            let base = rel.rsplit('/').next().unwrap_or_default();
            if base.starts_with(WHITEOUT_PREFIX) {
                self.whiteout(&rel, &added).with_context(|| format!("entry {name}"))?;
                continue;
            }
            let header = entry.header();
            let old = header.as_old();
            let mode = numeric(header.mode().map(u64::from), &old.mode, &name)? as u32 & 0o7777;
            let owner =
                Owner { uid: numeric(header.uid(), &old.uid, &name)?, gid: numeric(header.gid(), &old.gid, &name)? };
            match kind {
                EntryType::Directory => self.put_dir(&rel, &name, mode)?,
                EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                    self.put_file(&mut entry, &rel, &name, mode)?
                }
                EntryType::Symlink => {
                    let target = entry.link_name().map_err(bad_tar)?.ok_or_else(|| anyhow!("{name} has no target"))?;
                    let target = target.to_str().ok_or_else(|| anyhow!("symlink {name} is not UTF-8"))?.to_owned();
                    self.put_symlink(&rel, &name, &target)?;
                }
                EntryType::Link => {
                    let target = entry.link_name().map_err(bad_tar)?.ok_or_else(|| anyhow!("{name} has no target"))?;
                    let target = target.to_str().ok_or_else(|| anyhow!("hard link {name} is not UTF-8"))?.to_owned();
                    if !self.put_hard_link(&rel, &name, &target)? {
                        continue;
                    }
                }
                EntryType::Char | EntryType::Block | EntryType::Fifo => {
                    self.stats.skipped_specials += 1;
                    if self.stats.skipped_specials <= 5 {
                        self.stats.notes.push(format!("skipped /{rel}: a {kind:?} entry"));
                    }
                    continue;
                }
                other => bail!("entry {name} has tar type {other:?}, which a layer cannot hold"),
            }
            self.tree.set_owner(&rel, owner)?;
            added.insert(&rel);
        }
        let mut hashing = archive.into_inner();
        io::copy(&mut hashing, &mut io::sink()).map_err(bad_tar)?;
        let actual = format!("sha256:{}", hex::encode(hashing.hasher.finalize()));
        if let Some(expected) = &image.layers[index].diff_id
            && *expected != actual
        {
            bail!(
                "its uncompressed content is {actual} but the config's rootfs.diff_ids says {expected}; the image \
                 is corrupt or was tampered with"
            );
        }
        Ok(())
    }

    /// Makes the parents of `rel` real directories (creating missing ones,
    /// 0755); refuses a symlink or a non-directory on the way.
    fn parents(&mut self, rel: &str, name: &str) -> Result<()> {
        let mut path = self.tree.root().to_owned();
        let parts: Vec<&str> = rel.split('/').collect();
        for (i, part) in parts[..parts.len() - 1].iter().enumerate() {
            path.push(part);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => {}
                Ok(meta) if meta.file_type().is_symlink() => {
                    bail!("entry {name} would be written through the symlink /{}; refused", parts[..=i].join("/"))
                }
                Ok(_) => bail!("entry {name} is below /{}, which is not a directory", parts[..=i].join("/")),
                Err(_) => fs::DirBuilder::new()
                    .mode(0o755)
                    .create(&path)
                    .with_context(|| format!("mkdir /{}", parts[..=i].join("/")))?,
            }
        }
        Ok(())
    }

    /// Deletes `rel` and what is below it (and the modes recorded for them).
    fn remove(&mut self, rel: &str) -> Result<()> {
        self.tree.remove(rel)?;
        self.dir_modes.remove(rel);
        let below: Vec<String> =
            self.dir_modes.range(format!("{rel}/")..format!("{rel}0")).map(|(k, _)| k.clone()).collect();
        for key in below {
            self.dir_modes.remove(&key);
        }
        Ok(())
    }

    /// Clears the way for a non-directory at `rel` (parents made, old entry gone).
    fn replace(&mut self, rel: &str, name: &str) -> Result<()> {
        self.parents(rel, name)?;
        if fs::symlink_metadata(self.tree.host(rel)).is_ok() {
            self.remove(rel)?;
        }
        Ok(())
    }

    fn put_dir(&mut self, rel: &str, name: &str, mode: u32) -> Result<()> {
        self.parents(rel, name)?;
        let host = self.tree.host(rel);
        match fs::symlink_metadata(&host) {
            Ok(meta) if meta.is_dir() => {}
            existing => {
                if existing.is_ok() {
                    self.remove(rel)?;
                }
                fs::DirBuilder::new().mode(0o755).create(&host).with_context(|| format!("mkdir /{rel}"))?;
                fs::set_permissions(&host, fs::Permissions::from_mode(0o755))
                    .with_context(|| format!("chmod /{rel}"))?;
            }
        }
        self.dir_modes.insert(rel.to_owned(), mode);
        self.stats.dirs += 1;
        Ok(())
    }

    fn put_file<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, rel: &str, name: &str, mode: u32) -> Result<()> {
        let size = entry.size();
        if size > self.limits.max_entry_bytes {
            bail!("entry {name} is {size} bytes, more than the {} allowed for one file", self.limits.max_entry_bytes);
        }
        if self.stats.bytes + size > self.limits.max_total_bytes {
            bail!(
                "entry {name} ({size} bytes) takes the image's files past the {} bytes allowed in all",
                self.limits.max_total_bytes
            );
        }
        self.replace(rel, name)?;
        let host = self.tree.host(rel);
        // O_EXCL: the path was cleared, so nothing at it (a symlink least of all) is followed.
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&host)
            .with_context(|| format!("create /{rel}"))?;
        let copied = io::copy(&mut (&mut *entry).take(size), &mut file).map_err(bad_tar)?;
        if copied != size {
            bail!("entry {name} ends after {copied} of its {size} bytes");
        }
        file.set_permissions(fs::Permissions::from_mode(mode)).with_context(|| format!("chmod /{rel}"))?;
        self.stats.files += 1;
        self.stats.bytes += size;
        Ok(())
    }

    fn put_symlink(&mut self, rel: &str, name: &str, target: &str) -> Result<()> {
        if target.is_empty() {
            bail!("symlink {name} has an empty target");
        }
        self.replace(rel, name)?;
        symlink(target, self.tree.host(rel)).with_context(|| format!("create the symlink /{rel}"))?;
        self.stats.symlinks += 1;
        Ok(())
    }

    /// Links `rel` to `target`, a file or symlink already in the tree (an
    /// earlier entry of this image). False when there was nothing to do.
    fn put_hard_link(&mut self, rel: &str, name: &str, target: &str) -> Result<bool> {
        let target = entry_rel(target)?.ok_or_else(|| anyhow!("hard link {name} points at the root"))?;
        if target == rel {
            return Ok(false);
        }
        let meta = literal(self.tree, &target).ok_or_else(|| {
            anyhow!(
                "entry {name} is a hard link to /{target}, which is not in the tree (a hard link names an earlier \
                 file of the image, reached without symlinks)"
            )
        })?;
        if meta.is_dir() {
            bail!("entry {name} is a hard link to the directory /{target}; refused");
        }
        self.replace(rel, name)?;
        let (from, to) = (self.tree.host(&target), self.tree.host(rel));
        if fs::hard_link(&from, &to).is_err() {
            if !meta.is_file() {
                bail!("cannot link /{rel} to /{target}");
            }
            fs::copy(&from, &to).with_context(|| format!("copy /{target} to /{rel}"))?;
        }
        self.stats.hard_links += 1;
        Ok(true)
    }

    fn whiteout(&mut self, rel: &str, added: &Added) -> Result<()> {
        let (dir, base) = rel.rsplit_once('/').unwrap_or(("", rel));
        if base == OPAQUE {
            if dir.is_empty() {
                // The root made opaque: everything lower goes.
                self.prune_lower("", added)?;
            } else if literal(self.tree, dir).is_some_and(|m| m.is_dir()) {
                self.prune_lower(dir, added)?;
            }
            self.stats.opaque_dirs += 1;
            return Ok(());
        }
        let deleted = &base[WHITEOUT_PREFIX.len()..];
        if deleted.is_empty() || deleted.starts_with(WHITEOUT_PREFIX) {
            return Ok(()); // aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): nothing to delete
        }
        let target = if dir.is_empty() { deleted.to_owned() } else { format!("{dir}/{deleted}") };
        let Some(meta) = literal(self.tree, &target) else { return Ok(()) };
        if added.contains(&target) {
            // This layer (re)made it: only what lower layers left below it goes.
            if meta.is_dir() {
                self.prune_lower(&target, added)?;
            }
            return Ok(());
        }
        self.remove(&target)?;
        self.stats.whiteouts += 1;
        Ok(())
    }

    /// Deletes what is in `dir` (a real directory) that this layer did not add.
    fn prune_lower(&mut self, dir: &str, added: &Added) -> Result<()> {
        let host = self.tree.host(dir);
        let mut names = Vec::new();
        for child in fs::read_dir(&host).with_context(|| format!("list /{dir}"))? {
            let name = child.with_context(|| format!("list /{dir}"))?.file_name();
            names.push(name.into_string().map_err(|n| anyhow!("/{dir}/{n:?} is not UTF-8"))?);
        }
        for name in names {
            let rel = if dir.is_empty() { name } else { format!("{dir}/{name}") };
            if added.contains(&rel) {
                if fs::symlink_metadata(self.tree.host(&rel)).is_ok_and(|m| m.is_dir()) {
                    self.prune_lower(&rel, added)?;
                }
            } else {
                self.remove(&rel)?;
            }
        }
        Ok(())
    }
}
