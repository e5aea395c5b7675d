//! The snapshot archive (`snapsign_tar_zstd_v1`): writing a tree as a
//! deterministic tar.zst while hashing it, and reading one back (the parent of
//! a diff build) with every rule of the format checked. Layout: crate docs.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt, symlink};
use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail, ensure};
use sha2::{Digest, Sha256};
use tar::{EntryType, Header};

use crate::blocks::{ParallelBlocks, Zstd, default_workers};
use crate::snapshot::{FORMAT_VERSION, MANIFEST_ENTRY, ROOTFS_PREFIX, SnapshotManifest};
use crate::tree::{Entry, Kind, Owner, Tree, is_plain_relative};

/// zstd level: fast, and the same level always gives the same bytes. The
/// archive is compressed in 1 MiB blocks, one zstd frame each, on every core
/// ([`crate::blocks`]); a block that looks random is a frame of raw blocks.
const ZSTD_LEVEL: i32 = 3;

/// The archive file, telling an observer how many bytes it holds.
struct Observed<'a> {
    file: File,
    written: u64,
    on_written: &'a dyn Fn(u64) -> io::Result<()>,
}

impl Write for Observed<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.file.write(buf)?;
        self.written += n as u64;
        (self.on_written)(self.written)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// What was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArchiveSummary {
    /// Lower-case hex sha256 of the archive file.
    pub sha256: String,
    pub size_bytes: u64,
    /// Entries under `rootfs/`.
    pub files: u64,
}

/// How an entry looked, to tell whether a build changed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    pub kind: Kind,
    pub mode: u32,
    pub owner: Owner,
    pub size: u64,
    pub link: Option<String>,
    /// sha256 of a file's content.
    pub digest: Option<[u8; 32]>,
}

/// The parent's entries by tree-relative path.
pub type ParentIndex = BTreeMap<String, Signature>;

/// A parent archive that passed every check.
#[derive(Debug, Clone)]
pub struct ParentSnapshot {
    pub manifest: SnapshotManifest,
    pub index: ParentIndex,
    /// The paths its whiteouts delete (a diff archive).
    pub deleted: Vec<String>,
}

impl ParentSnapshot {
    /// Lays this archive's index over `below` (the layers under it): its
    /// whiteouts delete, its entries replace (a non-directory also hides
    /// what was below the path).
    pub fn merge_into(self, below: &mut ParentIndex) {
        let drop_tree = |index: &mut ParentIndex, rel: &str| {
            let prefix = format!("{rel}/");
            index.retain(|k, _| k != rel && !k.starts_with(&prefix));
        };
        for rel in &self.deleted {
            drop_tree(below, rel);
        }
        for (rel, signature) in self.index {
            if signature.kind != Kind::Dir {
                drop_tree(below, &rel);
            }
            below.insert(rel, signature);
        }
    }
}

/// A writer that hashes and counts what passes through.
pub struct HashingWriter<W> {
    inner: W,
    hasher: Sha256,
    bytes: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        HashingWriter { inner, hasher: Sha256::new(), bytes: 0 }
    }

    /// (inner writer, sha256, byte count)
    pub fn finish(self) -> (W, [u8; 32], u64) {
        (self.inner, self.hasher.finalize().into(), self.bytes)
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The name prefix that marks a deletion in a diff archive (OCI's whiteout).
pub const WHITEOUT_PREFIX: &str = ".wh.";

/// What the archive writes for one path: a tree entry, or the whiteout of a
/// parent's entry the build deleted.
enum Item {
    Entry(Entry),
    Whiteout(String),
}

impl Item {
    /// The path as the archive names it (without `rootfs/`).
    fn rel(&self) -> String {
        match self {
            Item::Entry(entry) => entry.rel.clone(),
            Item::Whiteout(rel) => match rel.rsplit_once('/') {
                Some((dir, name)) => format!("{dir}/{WHITEOUT_PREFIX}{name}"),
                None => format!("{WHITEOUT_PREFIX}{rel}"),
            },
        }
    }
}

/// Writes `tree` to `out` as `snapshot.json` + `rootfs/…`, streaming through
/// zstd into the file while hashing. With `parent`, only entries that are new
/// or differ from the parent's (kind, mode, owner, size, content or link
/// target) are written, plus a whiteout (`dir/.wh.name`, an empty file) for
/// each parent entry the build deleted whose directory is still there: the
/// archive of a diff build is a layer over its parent.
/// `manifest.files` is filled in here.
pub fn write_archive(
    out: &Path,
    manifest: SnapshotManifest,
    tree: &Tree,
    parent: Option<&ParentIndex>,
) -> Result<ArchiveSummary> {
    write_archive_observed(out, manifest, tree, parent, &|_| Ok(()))
}

/// [`write_archive`], telling `on_written` how many bytes of the archive
/// are in the file each time more are (so its parts can be uploaded while
/// the rest is written); an error it returns stops the writing.
pub fn write_archive_observed(
    out: &Path,
    mut manifest: SnapshotManifest,
    tree: &Tree,
    parent: Option<&ParentIndex>,
    on_written: &dyn Fn(u64) -> io::Result<()>,
) -> Result<ArchiveSummary> {
    let entries = tree.entries().context("list the tree")?;
    if let Some(reserved) =
        entries.iter().find(|e| e.rel.rsplit('/').next().is_some_and(|n| n.starts_with(WHITEOUT_PREFIX)))
    {
        bail!(
            "the rootfs holds /{}: names beginning with {WHITEOUT_PREFIX} mark deletions in {FORMAT_VERSION} \
             snapshots; rename it",
            reserved.rel
        );
    }
    let mut items: Vec<Item> = Vec::with_capacity(entries.len());
    match parent {
        None => items.extend(entries.into_iter().map(Item::Entry)),
        Some(parent) => {
            let dirs: std::collections::BTreeSet<&str> =
                entries.iter().filter(|e| e.kind == Kind::Dir).map(|e| e.rel.as_str()).collect();
            let present: std::collections::BTreeSet<&str> = entries.iter().map(|e| e.rel.as_str()).collect();
            for rel in parent.keys() {
                let dir_kept = rel.rsplit_once('/').is_none_or(|(dir, _)| dirs.contains(dir));
                if !present.contains(rel.as_str()) && dir_kept {
                    items.push(Item::Whiteout(rel.clone()));
                }
            }
            for entry in entries {
                if is_changed(tree, &entry, parent.get(&entry.rel))? {
                    items.push(Item::Entry(entry));
                }
            }
            items.sort_by_cached_key(|item| item.rel().split('/').map(str::to_owned).collect::<Vec<_>>());
        }
    }
    manifest.files = items.len() as u64;

    let file = File::create(out).with_context(|| format!("create {}", out.display()))?;
    let observed = Observed { file, written: 0, on_written };
    let hashing = HashingWriter::new(BufWriter::with_capacity(1 << 20, observed));
    let encoder = ParallelBlocks::new(hashing, Zstd::level(ZSTD_LEVEL), default_workers()).context("start zstd")?;
    let mut builder = tar::Builder::new(encoder);

    let json = serde_json::to_vec_pretty(&manifest).expect("the manifest serializes");
    let mut header = tar_header(EntryType::Regular, 0o644, Owner::default(), json.len() as u64);
    builder.append_data(&mut header, MANIFEST_ENTRY, json.as_slice()).context("write snapshot.json")?;

    for item in &items {
        let entry = match item {
            Item::Entry(entry) => entry,
            Item::Whiteout(rel) => {
                let mut header = tar_header(EntryType::Regular, 0o644, Owner::default(), 0);
                builder
                    .append_data(&mut header, format!("{ROOTFS_PREFIX}{}", item.rel()), io::empty())
                    .with_context(|| format!("write the whiteout of /{rel} to the archive"))?;
                continue;
            }
        };
        let path = format!("{ROOTFS_PREFIX}{}", entry.rel);
        match entry.kind {
            Kind::Dir => {
                let mut header = tar_header(EntryType::Directory, entry.mode, entry.owner, 0);
                builder.append_data(&mut header, format!("{path}/"), io::empty())
            }
            Kind::File => {
                let mut header = tar_header(EntryType::Regular, entry.mode, entry.owner, entry.size);
                let file = File::open(tree.host(&entry.rel)).with_context(|| format!("open /{}", entry.rel))?;
                builder.append_data(&mut header, &path, file.take(entry.size))
            }
            Kind::Symlink => {
                let mut header = tar_header(EntryType::Symlink, entry.mode, entry.owner, 0);
                builder.append_link(&mut header, &path, entry.link.as_deref().unwrap_or_default())
            }
        }
        .with_context(|| format!("write /{} to the archive", entry.rel))?;
    }
    let encoder = builder.into_inner().context("finish the tar stream")?;
    let (hashing, _) = encoder.finish().context("finish the zstd stream")?;
    let (writer, digest, size_bytes) = hashing.finish();
    let sha256 = hex::encode(digest);
    let observed = writer.into_inner().map_err(|e| e.into_error()).context("flush the archive")?;
    observed.file.sync_all().context("sync the archive")?;
    Ok(ArchiveSummary { sha256, size_bytes, files: manifest.files })
}

/// A deterministic header: mtime 0, no user or group names.
fn tar_header(kind: EntryType, mode: u32, owner: Owner, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(owner.uid);
    header.set_gid(owner.gid);
    header.set_mtime(0);
    header.set_size(size);
    header
}

fn is_changed(tree: &Tree, entry: &Entry, before: Option<&Signature>) -> Result<bool> {
    let Some(before) = before else { return Ok(true) };
    if before.kind != entry.kind
        || before.mode != entry.mode
        || before.owner != entry.owner
        || before.size != entry.size
        || before.link != entry.link
    {
        return Ok(true);
    }
    if entry.kind != Kind::File {
        return Ok(false);
    }
    let mut file = File::open(tree.host(&entry.rel)).with_context(|| format!("open /{}", entry.rel))?;
    let mut hasher = HashingWriter::new(io::sink());
    io::copy(&mut file, &mut hasher).with_context(|| format!("read /{}", entry.rel))?;
    Ok(before.digest != Some(hasher.finish().1))
}

/// Reads and checks an archive: zstd-compressed tar, `snapshot.json` first with
/// `formatVersion` = `snapsign_tar_zstd_v1`, then only `rootfs/` entries
/// (directories, files, symlinks) with plain relative paths in strictly sorted
/// order, exactly `files` of them (whiteouts included; only a diff archive
/// may hold whiteouts). With `into`, the rootfs is extracted into the tree
/// (owners recorded, modes applied, no write through a symlink) and a
/// whiteout deletes what it names.
pub fn read_archive(path: &Path, mut into: Option<&mut Tree>) -> Result<ParentSnapshot> {
    let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let decoder = zstd::Decoder::new(file).context("start zstd")?;
    let mut archive = tar::Archive::new(decoder);
    let entries = archive.entries().map_err(not_the_format)?;
    let mut manifest: Option<SnapshotManifest> = None;
    let mut index = ParentIndex::new();
    let mut previous: Option<String> = None;
    let mut dir_modes = Vec::new();
    let mut count = 0u64;
    let mut deleted = Vec::new();
    for entry in entries {
        let mut entry = entry.map_err(not_the_format)?;
        let name = entry.path().map_err(not_the_format)?.to_str().map(str::to_owned);
        let name = name.ok_or_else(|| anyhow!("an entry path is not UTF-8"))?;
        let header = entry.header().clone();
        if manifest.is_none() {
            ensure!(
                name == MANIFEST_ENTRY && header.entry_type() == EntryType::Regular,
                "the first entry is {name}, expected {MANIFEST_ENTRY}"
            );
            let mut text = String::new();
            (&mut entry).take(1 << 20).read_to_string(&mut text).context("read snapshot.json")?;
            let parsed: SnapshotManifest = serde_json::from_str(&text).context("parse snapshot.json")?;
            ensure!(
                parsed.format_version == FORMAT_VERSION,
                "snapshot.json formatVersion is {}, expected {FORMAT_VERSION}",
                parsed.format_version
            );
            manifest = Some(parsed);
            continue;
        }
        let rel = name
            .strip_prefix(ROOTFS_PREFIX)
            .map(|r| r.trim_end_matches('/').to_owned())
            .filter(|r| is_plain_relative(r))
            .ok_or_else(|| anyhow!("entry {name} is not a plain path under {ROOTFS_PREFIX}"))?;
        if let Some(previous) = &previous {
            ensure!(
                previous.split('/').lt(rel.split('/')),
                "entry {name} is out of order or repeated (after {ROOTFS_PREFIX}{previous})"
            );
        }
        previous = Some(rel.clone());
        count += 1;
        let (dir, last) = rel.rsplit_once('/').map_or(("", rel.as_str()), |(d, n)| (d, n));
        if let Some(deleted_name) = last.strip_prefix(WHITEOUT_PREFIX) {
            let node_kind = manifest.as_ref().map(|m| m.node_kind.as_str()).unwrap_or_default();
            ensure!(node_kind == "diff", "entry {name} is a whiteout, which only a diff archive may hold");
            ensure!(
                header.entry_type() == EntryType::Regular && entry.size() == 0 && is_plain_relative(deleted_name),
                "entry {name} is not a whiteout (an empty file {WHITEOUT_PREFIX}<name>)"
            );
            if let Some(tree) = into.as_deref_mut() {
                let target = if dir.is_empty() { deleted_name.to_owned() } else { format!("{dir}/{deleted_name}") };
                tree.remove(&target).with_context(|| format!("apply the whiteout {name}"))?;
            }
            deleted.push(if dir.is_empty() { deleted_name.to_owned() } else { format!("{dir}/{deleted_name}") });
            continue;
        }
        let mode = header.mode().map_err(not_the_format)? & 0o7777;
        let owner = Owner { uid: header.uid().map_err(not_the_format)?, gid: header.gid().map_err(not_the_format)? };
        let signature = match header.entry_type() {
            EntryType::Directory => {
                if let Some(tree) = into.as_deref_mut() {
                    let host = tree.host(&rel);
                    tree.ensure_parent_dirs(&rel)?;
                    match fs::symlink_metadata(&host) {
                        Ok(meta) if meta.is_dir() => {}
                        // Over a lower layer's file or link: the directory replaces it.
                        existing => {
                            if existing.is_ok() {
                                tree.remove(&rel)?;
                            }
                            fs::DirBuilder::new().mode(0o755).create(&host).with_context(|| format!("mkdir /{rel}"))?
                        }
                    }
                    tree.set_owner(&rel, owner)?;
                    dir_modes.push((rel.clone(), mode));
                }
                Signature { kind: Kind::Dir, mode, owner, size: 0, link: None, digest: None }
            }
            EntryType::Regular | EntryType::Continuous => {
                let size = entry.size();
                let digest = match into.as_deref_mut() {
                    Some(tree) => {
                        tree.ensure_parent_dirs(&rel)?;
                        let host = tree.host(&rel);
                        // Over a lower layer's entry (the order check keeps one archive from repeating a path).
                        tree.remove(&rel)?;
                        let out = File::create(&host).with_context(|| format!("create /{rel}"))?;
                        let mut writer = HashingWriter::new(BufWriter::new(out));
                        io::copy(&mut entry, &mut writer).map_err(not_the_format)?;
                        let (out, digest, _) = writer.finish();
                        out.into_inner().map_err(|e| e.into_error()).with_context(|| format!("write /{rel}"))?;
                        fs::set_permissions(&host, fs::Permissions::from_mode(mode))
                            .with_context(|| format!("chmod /{rel}"))?;
                        tree.set_owner(&rel, owner)?;
                        digest
                    }
                    None => {
                        let mut hasher = HashingWriter::new(io::sink());
                        io::copy(&mut entry, &mut hasher).map_err(not_the_format)?;
                        hasher.finish().1
                    }
                };
                Signature { kind: Kind::File, mode, owner, size, link: None, digest: Some(digest) }
            }
            EntryType::Symlink => {
                let target =
                    entry.link_name().map_err(not_the_format)?.ok_or_else(|| anyhow!("{name} has no target"))?;
                let target = target.to_str().ok_or_else(|| anyhow!("symlink {name} is not UTF-8"))?.to_owned();
                if let Some(tree) = into.as_deref_mut() {
                    tree.ensure_parent_dirs(&rel)?;
                    tree.remove(&rel)?;
                    symlink(&target, tree.host(&rel)).with_context(|| format!("create symlink /{rel}"))?;
                    tree.set_owner(&rel, owner)?;
                }
                Signature { kind: Kind::Symlink, mode, owner, size: 0, link: Some(target), digest: None }
            }
            other => bail!("entry {name} has type {other:?}; only directories, files and symlinks are allowed"),
        };
        index.insert(rel, signature);
    }
    let manifest = manifest.ok_or_else(|| anyhow!("the archive is empty (no {MANIFEST_ENTRY})"))?;
    ensure!(
        manifest.files == count,
        "snapshot.json says files={} but the archive has {count} rootfs entries",
        manifest.files
    );
    if let Some(tree) = into {
        // Deepest first, so a read-only directory is closed only after its contents were written.
        for (rel, mode) in dir_modes.iter().rev() {
            fs::set_permissions(tree.host(rel), fs::Permissions::from_mode(*mode))
                .with_context(|| format!("chmod /{rel}"))?;
        }
    }
    Ok(ParentSnapshot { manifest, index, deleted })
}

fn not_the_format(e: io::Error) -> anyhow::Error {
    anyhow!("not a zstd-compressed tar of format {FORMAT_VERSION}: {e}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::ImageConfig;

    fn manifest(kind: &str) -> SnapshotManifest {
        SnapshotManifest {
            format_version: FORMAT_VERSION.into(),
            snapshot_id: "snap-1".into(),
            node_kind: kind.into(),
            parent_manifest_uri: None,
            config: ImageConfig { workdir: "/app".into(), ..Default::default() },
            files: 0,
        }
    }

    fn sample_tree(dir: &Path) -> Tree {
        let mut tree = Tree::create(dir.join("tree")).unwrap();
        tree.make_dirs("/app/bin").unwrap();
        fs::write(tree.host("app/bin/run"), "#!/bin/sh\necho hi\n").unwrap();
        fs::set_permissions(tree.host("app/bin/run"), fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(tree.host("app/data.txt"), "data").unwrap();
        fs::set_permissions(tree.host("app/data.txt"), fs::Permissions::from_mode(0o644)).unwrap();
        symlink("bin/run", tree.host("app/run")).unwrap();
        tree.set_owner("app/data.txt", Owner { uid: 1000, gid: 1000 }).unwrap();
        let long = "d".repeat(120);
        tree.make_dirs(&format!("/deep/{long}")).unwrap();
        fs::write(tree.host(&format!("deep/{long}/file-with-a-long-path")), "x").unwrap();
        tree
    }

    #[test]
    fn same_tree_gives_the_same_sha256() {
        let dir = tempfile::tempdir().unwrap();
        let tree = sample_tree(dir.path());
        let a = write_archive(&dir.path().join("a.tar.zst"), manifest("base"), &tree, None).unwrap();
        let b = write_archive(&dir.path().join("b.tar.zst"), manifest("base"), &tree, None).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.size_bytes, fs::metadata(dir.path().join("a.tar.zst")).unwrap().len());
        let bytes = fs::read(dir.path().join("a.tar.zst")).unwrap();
        assert_eq!(a.sha256, hex::encode(Sha256::digest(&bytes)));
        // A second tree built the same way elsewhere (other mtimes, other path) matches too.
        let other = tempfile::tempdir().unwrap();
        let tree2 = sample_tree(other.path());
        let c = write_archive(&other.path().join("c.tar.zst"), manifest("base"), &tree2, None).unwrap();
        assert_eq!(a.sha256, c.sha256);
    }

    #[test]
    fn archive_round_trips_manifest_files_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let tree = sample_tree(dir.path());
        let out = dir.path().join("a.tar.zst");
        let summary = write_archive(&out, manifest("base"), &tree, None).unwrap();
        assert_eq!(summary.files, 8);

        // Raw order: snapshot.json first, then sorted rootfs entries with mtime 0.
        let mut raw = tar::Archive::new(zstd::Decoder::new(File::open(&out).unwrap()).unwrap());
        let names: Vec<(String, u64)> = raw
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().to_str().unwrap().to_owned(), e.header().mtime().unwrap())
            })
            .collect();
        assert_eq!(names[0].0, "snapshot.json");
        assert_eq!(names[1].0, "rootfs/app/");
        assert!(names.iter().all(|(_, mtime)| *mtime == 0));

        let mut copy = Tree::create(dir.path().join("copy")).unwrap();
        let parent = read_archive(&out, Some(&mut copy)).unwrap();
        assert_eq!(parent.manifest.files, 8);
        assert_eq!(parent.manifest.config.workdir, "/app");
        assert_eq!(fs::read_to_string(copy.host("app/bin/run")).unwrap(), "#!/bin/sh\necho hi\n");
        assert_eq!(fs::metadata(copy.host("app/bin/run")).unwrap().permissions().mode() & 0o777, 0o755);
        assert_eq!(fs::read_link(copy.host("app/run")).unwrap(), Path::new("bin/run"));
        assert_eq!(copy.owner("app/data.txt"), Owner { uid: 1000, gid: 1000 });
        assert_eq!(copy.entries().unwrap(), tree.entries().unwrap());
        assert_eq!(parent.index["app/data.txt"].digest, Some(Sha256::digest(b"data").into()));
    }

    #[test]
    fn diff_archive_holds_only_new_and_changed_entries() {
        let dir = tempfile::tempdir().unwrap();
        let tree = sample_tree(dir.path());
        let parent_path = dir.path().join("parent.tar.zst");
        write_archive(&parent_path, manifest("base"), &tree, None).unwrap();

        let mut child = Tree::create(dir.path().join("child")).unwrap();
        let parent = read_archive(&parent_path, Some(&mut child)).unwrap();
        fs::write(child.host("app/data.txt"), "DATA").unwrap(); // same size, new content
        fs::write(child.host("app/new.txt"), "new").unwrap();
        fs::set_permissions(child.host("app/new.txt"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::set_permissions(child.host("app/bin"), fs::Permissions::from_mode(0o700)).unwrap();
        fs::write(child.host("app/bin/run"), "#!/bin/sh\necho hi\n").unwrap(); // rewritten, unchanged
        let out = dir.path().join("diff.tar.zst");
        let summary = write_archive(&out, manifest("diff"), &child, Some(&parent.index)).unwrap();
        let back = read_archive(&out, None).unwrap();
        let mut changed: Vec<&str> = back.index.keys().map(String::as_str).collect();
        changed.sort();
        assert_eq!(changed, ["app/bin", "app/data.txt", "app/new.txt"]);
        assert_eq!(summary.files, 3);
        assert_eq!(back.manifest.node_kind, "diff");
    }

    #[test]
    fn a_whiteout_is_written_once_per_deleted_path_whose_directory_remains() {
        let dir = tempfile::tempdir().unwrap();
        let tree = sample_tree(dir.path());
        let parent_path = dir.path().join("parent.tar.zst");
        write_archive(&parent_path, manifest("base"), &tree, None).unwrap();
        let mut child = Tree::create(dir.path().join("child")).unwrap();
        let parent = read_archive(&parent_path, Some(&mut child)).unwrap();
        child.remove("app/bin").unwrap(); // a directory and its file: one whiteout
        child.remove("app/data.txt").unwrap();
        child.remove("deep").unwrap(); // a top-level directory
        fs::write(child.host("app/data.txt.new"), "n").unwrap();
        fs::set_permissions(child.host("app/data.txt.new"), fs::Permissions::from_mode(0o644)).unwrap();
        let out = dir.path().join("diff.tar.zst");
        write_archive(&out, manifest("diff"), &child, Some(&parent.index)).unwrap();
        let mut raw = tar::Archive::new(zstd::Decoder::new(File::open(&out).unwrap()).unwrap());
        let names: Vec<String> =
            raw.entries().unwrap().map(|e| e.unwrap().path().unwrap().to_str().unwrap().to_owned()).collect();
        assert_eq!(
            names,
            [
                "snapshot.json",
                "rootfs/.wh.deep",
                "rootfs/app/.wh.bin",
                "rootfs/app/.wh.data.txt",
                "rootfs/app/data.txt.new"
            ]
        );
        // Applied over the parent, the layer gives the child's tree.
        let mut again = Tree::create(dir.path().join("again")).unwrap();
        read_archive(&parent_path, Some(&mut again)).unwrap();
        let layer = read_archive(&out, Some(&mut again)).unwrap();
        assert_eq!(layer.manifest.files, 4);
        assert_eq!(again.entries().unwrap(), child.entries().unwrap());
        assert_eq!(again.owner("app/data.txt"), Owner::default(), "the deleted file's recorded owner went with it");
    }

    #[test]
    fn layers_unpack_over_each_other_and_their_indexes_merge_as_the_tree_does() {
        let dir = tempfile::tempdir().unwrap();
        let tree = sample_tree(dir.path());
        let base = dir.path().join("base.tar.zst");
        write_archive(&base, manifest("base"), &tree, None).unwrap();
        // A layer over it: a file changed, a directory replaced by a file, a file deleted.
        let mut next = Tree::create(dir.path().join("next")).unwrap();
        let below = read_archive(&base, Some(&mut next)).unwrap();
        fs::write(next.host("app/data.txt"), "changed").unwrap();
        next.remove("app/bin").unwrap();
        fs::write(next.host("app/bin"), "now a file").unwrap();
        fs::set_permissions(next.host("app/bin"), fs::Permissions::from_mode(0o644)).unwrap();
        next.remove("app/run").unwrap();
        let layer = dir.path().join("layer.tar.zst");
        write_archive(&layer, manifest("diff"), &next, Some(&below.index)).unwrap();
        // Unpacked over the base, the layer gives the same tree, and the merged index describes it.
        let mut again = Tree::create(dir.path().join("again")).unwrap();
        let mut index = ParentIndex::new();
        read_archive(&base, Some(&mut again)).unwrap().merge_into(&mut index);
        let top = read_archive(&layer, Some(&mut again)).unwrap();
        assert_eq!(top.deleted, ["app/run"]);
        top.merge_into(&mut index);
        assert_eq!(again.entries().unwrap(), next.entries().unwrap());
        let paths: Vec<&str> = index.keys().map(String::as_str).collect();
        let expected: Vec<String> = next.entries().unwrap().into_iter().map(|e| e.rel).collect();
        assert_eq!(paths, expected, "nothing of the old app/bin directory is left in the index");
        assert_eq!(index["app/data.txt"].digest, Some(Sha256::digest(b"changed").into()));
    }

    #[test]
    fn whiteouts_are_refused_in_a_base_archive_and_reserved_names_in_a_tree() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.tar.zst");
        let good = serde_json::to_vec(&SnapshotManifest { files: 1, ..manifest("base") }).unwrap();
        let mut builder = tar::Builder::new(zstd::Encoder::new(File::create(&path).unwrap(), 1).unwrap());
        let mut h = tar_header(EntryType::Regular, 0o644, Owner::default(), good.len() as u64);
        builder.append_data(&mut h, "snapshot.json", good.as_slice()).unwrap();
        let mut h = tar_header(EntryType::Regular, 0o644, Owner::default(), 0);
        builder.append_data(&mut h, "rootfs/.wh.etc", io::empty()).unwrap();
        builder.into_inner().unwrap().finish().unwrap();
        let err = format!("{:#}", read_archive(&path, None).unwrap_err());
        assert!(err.contains("entry rootfs/.wh.etc is a whiteout, which only a diff archive may hold"), "{err}");

        let tree = sample_tree(dir.path());
        fs::write(tree.host("app/.wh.x"), "").unwrap();
        let err = format!("{:#}", write_archive(&path, manifest("base"), &tree, None).unwrap_err());
        assert!(err.contains("the rootfs holds /app/.wh.x: names beginning with .wh. mark deletions"), "{err}");
    }

    #[test]
    fn reading_refuses_what_is_not_the_format() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk");
        fs::write(&junk, b"definitely not zstd").unwrap();
        let err = format!("{:#}", read_archive(&junk, None).unwrap_err());
        assert!(err.contains("not a zstd-compressed tar"), "{err}");

        // A tar.zst whose first entry is not snapshot.json.
        let write_raw = |path: &Path, entries: &[(&str, &[u8])]| {
            let mut builder = tar::Builder::new(zstd::Encoder::new(File::create(path).unwrap(), 1).unwrap());
            for (name, data) in entries {
                let mut h = tar_header(EntryType::Regular, 0o644, Owner::default(), data.len() as u64);
                builder.append_data(&mut h, name, *data).unwrap();
            }
            builder.into_inner().unwrap().finish().unwrap();
        };
        let bad = dir.path().join("bad.tar.zst");
        write_raw(&bad, &[("rootfs/a", b"a")]);
        let err = format!("{:#}", read_archive(&bad, None).unwrap_err());
        assert!(err.contains("the first entry is rootfs/a, expected snapshot.json"), "{err}");

        let other_version =
            serde_json::to_vec(&SnapshotManifest { format_version: "v0".into(), ..manifest("base") }).unwrap();
        write_raw(&bad, &[("snapshot.json", &other_version)]);
        let err = format!("{:#}", read_archive(&bad, None).unwrap_err());
        assert!(err.contains("formatVersion is v0, expected snapsign_tar_zstd_v1"), "{err}");

        let good = serde_json::to_vec(&SnapshotManifest { files: 1, ..manifest("base") }).unwrap();
        write_raw(&bad, &[("snapshot.json", &good), ("etc/passwd", b"x")]);
        let err = format!("{:#}", read_archive(&bad, None).unwrap_err());
        assert!(err.contains("entry etc/passwd is not a plain path under rootfs/"), "{err}");

        write_raw(&bad, &[("snapshot.json", &good), ("rootfs/b", b"x"), ("rootfs/a", b"x")]);
        let err = format!("{:#}", read_archive(&bad, None).unwrap_err());
        assert!(err.contains("out of order"), "{err}");

        write_raw(&bad, &[("snapshot.json", &good), ("rootfs/a", b"x"), ("rootfs/b", b"x")]);
        let err = format!("{:#}", read_archive(&bad, None).unwrap_err());
        assert!(err.contains("says files=1 but the archive has 2"), "{err}");
    }
}
