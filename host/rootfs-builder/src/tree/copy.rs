//! COPY and ADD from the build context into the tree, with Docker's
//! destination rules, `--chmod` and `--chown`.

use std::fs;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{Owner, Tree};
use crate::context::Context;
use crate::plan::CopyOp;

/// What one COPY did, for the build log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct CopyStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    pub notes: Vec<String>,
}

/// ADD would unpack these in Docker; the reference builder refuses rather than copy them differently.
fn looks_like_archive(name: &str) -> bool {
    [".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst"]
        .iter()
        .any(|ext| name.ends_with(ext))
}

/// Who the copies belong to: one owner, or each its source's in another tree.
#[derive(Clone, Copy)]
enum Owners<'a> {
    Fixed(Owner),
    Kept(&'a Tree),
}

impl Owners<'_> {
    fn of(self, source: &Path) -> Owner {
        match self {
            Owners::Fixed(owner) => owner,
            Owners::Kept(tree) => tree.owner_at(source),
        }
    }
}

impl Tree {
    /// Carries out a COPY/ADD from `context`: the build context, or (with
    /// `origin`, `COPY --from`) another tree, whose owners the copies keep
    /// unless `--chown` says otherwise.
    pub fn copy(&mut self, context: &Context, op: &CopyOp, origin: Option<&Tree>) -> Result<CopyStats> {
        let mut stats = CopyStats::default();
        let mut sources = Vec::new();
        for source in &op.sources {
            sources.extend(context.resolve(source)?);
        }
        let dest_exists_as_dir = fs::metadata(self.host(&self.resolve(&op.dest, true)?)).is_ok_and(|m| m.is_dir());
        let dest_is_dir = op.dest_is_dir || sources.len() > 1 || dest_exists_as_dir;
        let owner = match &op.chown {
            Some(chown) => Owners::Fixed(self.lookup_owner(chown, &mut stats.notes)),
            None => match origin {
                Some(tree) => Owners::Kept(tree),
                None => Owners::Fixed(Owner::default()),
            },
        };
        for source in &sources {
            let meta = fs::metadata(&source.path).with_context(|| format!("stat source {}", source.display))?;
            if meta.is_dir() {
                let existed = fs::symlink_metadata(self.host(&self.resolve(&op.dest, true)?)).is_ok();
                let rel = self.make_dirs(&op.dest)?;
                if !existed {
                    self.apply_meta(&rel, None, op.chmod, owner.of(&source.path))?;
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

    /// Copies all of `other` into this tree, owners kept (`FROM <earlier stage>`).
    pub fn copy_tree(&mut self, other: &Tree) -> Result<CopyStats> {
        let op = CopyOp {
            instruction: "COPY",
            line: 0,
            sources: vec![".".into()],
            dest: "/".into(),
            dest_is_dir: true,
            chmod: None,
            chown: None,
            from: None,
        };
        let context = Context::open(other.root())?;
        self.copy(&context, &op, Some(other))
    }

    fn copy_dir(&mut self, src: &Path, dest: &str, op: &CopyOp, owner: Owners, stats: &mut CopyStats) -> Result<()> {
        let mut children: Vec<_> = fs::read_dir(src)
            .with_context(|| format!("list {}", src.display()))?
            .collect::<Result<_, _>>()
            .with_context(|| format!("list {}", src.display()))?;
        children.sort_by_key(|e| e.file_name());
        // Runs of consecutive files: made replaceable in order, their bytes
        // copied on several CPUs, then their modes and owners set in order.
        // A run is copied before the next directory or link is made, so
        // nothing made meanwhile can stand at a file's destination.
        let mut files = Vec::new();
        for child in children {
            let name = child.file_name().into_string().map_err(|n| anyhow!("file name {n:?} is not UTF-8"))?;
            let path = child.path();
            let image_path = format!("{}/{name}", dest.trim_end_matches('/'));
            let kind = child.file_type().with_context(|| format!("stat {}", path.display()))?;
            if kind.is_file() {
                let rel = self.replaceable(&image_path)?;
                files.push((path, rel));
                continue;
            }
            self.copy_run(&mut files, op, owner, stats)?;
            if kind.is_dir() {
                let rel = self.make_dirs(&image_path)?;
                // Children first, so a read-only source directory is still writable while filled.
                self.copy_dir(&path, &image_path, op, owner, stats)?;
                let mode = fs::metadata(&path)?.permissions().mode();
                self.apply_meta(&rel, Some(mode), op.chmod, owner.of(&path))?;
                stats.dirs += 1;
            } else if kind.is_symlink() {
                // Copied as a link and never followed, so it cannot reach outside the context.
                let target = fs::read_link(&path).with_context(|| format!("read link {}", path.display()))?;
                let rel = self.replaceable(&image_path)?;
                symlink(&target, self.host(&rel)).with_context(|| format!("create symlink /{rel}"))?;
                self.set_owner(&rel, owner.of(&path))?;
                stats.symlinks += 1;
            } else {
                stats.notes.push(format!("skipped {}: not a file, directory or symlink", path.display()));
            }
        }
        self.copy_run(&mut files, op, owner, stats)
    }

    /// Copies a run of files made replaceable (source, path in the tree),
    /// then sets their modes and owners in order; empties the run.
    fn copy_run(
        &mut self,
        files: &mut Vec<(PathBuf, String)>,
        op: &CopyOp,
        owner: Owners,
        stats: &mut CopyStats,
    ) -> Result<()> {
        let jobs: Vec<(&Path, PathBuf, &str)> =
            files.iter().map(|(src, rel)| (src.as_path(), self.host(rel), rel.as_str())).collect();
        let copied = copy_files(&jobs, parallelism())?;
        for ((src, rel), bytes) in files.iter().zip(copied) {
            let mode = fs::metadata(src).with_context(|| format!("stat {}", src.display()))?.permissions().mode();
            self.apply_meta(rel, Some(mode), op.chmod, owner.of(src))?;
            stats.files += 1;
            stats.bytes += bytes;
        }
        files.clear();
        Ok(())
    }

    fn copy_file(
        &mut self,
        src: &Path,
        image_path: &str,
        op: &CopyOp,
        owner: Owners,
        stats: &mut CopyStats,
    ) -> Result<()> {
        let rel = self.replaceable(image_path)?;
        let host = self.host(&rel);
        let bytes = fs::copy(src, &host).with_context(|| format!("copy {} to /{rel}", src.display()))?;
        let mode = fs::metadata(src)?.permissions().mode();
        self.apply_meta(&rel, Some(mode), op.chmod, owner.of(src))?;
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
        self.set_owner(rel, owner)?;
        Ok(())
    }
}

/// Files smaller than this in all are copied on one thread.
const PARALLEL_COPY_BYTES: u64 = 4 << 20;

/// The threads a run of files is copied on: the CPUs this process may use, at most four.
fn parallelism() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).min(4)
}

/// Copies each (source, destination on the host, path in the image) job's
/// bytes into a new file (created exclusively, so nothing at the
/// destination, a link least of all, is followed; the kernel's
/// copy_file_range does the bytes), on up to `threads` threads when there is
/// enough to copy; returns the bytes of each, in order. The first failure
/// in order is the error, naming the source and the path in the image.
fn copy_files(jobs: &[(&Path, PathBuf, &str)], threads: usize) -> Result<Vec<u64>> {
    use std::os::unix::fs::OpenOptionsExt;
    let copy = |(src, dst, rel): &(&Path, PathBuf, &str)| {
        let copied = (|| {
            let mut from = fs::File::open(src)?;
            let mut to = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dst)?;
            std::io::copy(&mut from, &mut to)
        })();
        copied.with_context(|| format!("copy {} to /{rel}", src.display()))
    };
    let threads = threads.min(jobs.len());
    if threads < 2
        || jobs.iter().filter_map(|(src, ..)| fs::metadata(src).ok()).map(|m| m.len()).sum::<u64>()
            < PARALLEL_COPY_BYTES
    {
        return jobs.iter().map(copy).collect();
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    let mut done: Vec<Option<Result<u64>>> = std::iter::repeat_with(|| None).take(jobs.len()).collect();
    let results = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(job) = jobs.get(i) else { return mine };
                        mine.push((i, copy(job)));
                    }
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or_default()).collect::<Vec<_>>()
    });
    for (i, result) in results.into_iter().flatten() {
        done[i] = Some(result);
    }
    done.into_iter()
        .enumerate()
        .map(|(i, r)| {
            r.unwrap_or_else(|| Err(anyhow!("copy {} to /{}: its thread panicked", jobs[i].0.display(), jobs[i].2)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::context::tests::write;
    use crate::plan::Chown;

    fn op(sources: &[&str], dest: &str, dest_is_dir: bool) -> CopyOp {
        CopyOp {
            instruction: "COPY",
            line: 2,
            sources: sources.iter().map(|s| s.to_string()).collect(),
            dest: dest.into(),
            dest_is_dir,
            chmod: None,
            chown: None,
            from: None,
        }
    }

    fn setup() -> (tempfile::TempDir, Context, Tree) {
        let (dir, context) = crate::context::tests::setup();
        let tree = Tree::create(dir.path().join("tree")).unwrap();
        (dir, context, tree)
    }

    fn read(tree: &Tree, image_path: &str) -> String {
        fs::read_to_string(tree.host(image_path.trim_start_matches('/'))).unwrap()
    }

    #[test]
    fn copy_follows_docker_destination_rules() {
        let (_dir, context, mut tree) = setup();
        // Directory source: its contents land in dest.
        tree.copy(&context, &op(&["app"], "/srv", false), None).unwrap();
        assert_eq!(read(&tree, "/srv/main.py"), "print(1)\n");
        assert_eq!(read(&tree, "/srv/lib/util.py"), "x = 1\n");
        // File to a path not ending in / : that path is the file.
        tree.copy(&context, &op(&["README.md"], "/docs/readme", false), None).unwrap();
        assert_eq!(read(&tree, "/docs/readme"), "readme\n");
        // File into an existing directory or a dir destination keeps its name.
        tree.copy(&context, &op(&["a.txt"], "/srv", false), None).unwrap();
        assert_eq!(read(&tree, "/srv/a.txt"), "a\n");
        tree.copy(&context, &op(&["a.txt"], "/new", true), None).unwrap();
        assert_eq!(read(&tree, "/new/a.txt"), "a\n");
        // Several sources mean a directory.
        let stats = tree.copy(&context, &op(&["*.txt"], "/many", false), None).unwrap();
        assert_eq!((stats.files, stats.bytes), (2, 5));
        assert_eq!(read(&tree, "/many/b.txt"), "bb\n");
        // Overwriting a file replaces it.
        tree.copy(&context, &op(&["b.txt"], "/docs/readme", false), None).unwrap();
        assert_eq!(read(&tree, "/docs/readme"), "bb\n");
        let stats = tree.copy(&context, &op(&["a.txt"], "/srv/lib", false), None).unwrap();
        assert_eq!(stats.files, 1, "an existing directory destination receives the file");
        assert_eq!(read(&tree, "/srv/lib/a.txt"), "a\n");
    }

    /// A directory with more than [`PARALLEL_COPY_BYTES`] of files is copied
    /// on several threads: every file arrives whole, with its own mode and
    /// owner, a file already at a destination is replaced, and a source that
    /// cannot be read fails the COPY naming its path in the image.
    #[test]
    fn a_large_directory_copied_on_several_threads_arrives_whole_with_its_modes() {
        let (dir, context, mut tree) = setup();
        let big = dir.path().join("context/big");
        fs::create_dir_all(&big).unwrap();
        let mut expected = Vec::new();
        for i in 0..24u32 {
            let bytes: Vec<u8> = (0..(300_000 + i as usize * 1_000)).map(|b| (b as u32 * 31 + i) as u8).collect();
            let name = format!("f{i:02}.bin");
            fs::write(big.join(&name), &bytes).unwrap();
            let mode = if i % 3 == 0 { 0o755 } else { 0o640 };
            fs::set_permissions(big.join(&name), fs::Permissions::from_mode(mode)).unwrap();
            expected.push((name, bytes, mode));
        }
        let total: u64 = expected.iter().map(|(_, b, _)| b.len() as u64).sum();
        assert!(total > PARALLEL_COPY_BYTES, "the test must reach the parallel path");
        write(&tree.host("srv/f05.bin"), "an older file");
        let stats = tree.copy(&context, &op(&["big"], "/srv", false), None).unwrap();
        assert_eq!((stats.files, stats.bytes), (24, total));
        for (name, bytes, mode) in &expected {
            let host = tree.host(&format!("srv/{name}"));
            assert!(fs::read(&host).unwrap() == *bytes, "{name} changed on the way");
            assert_eq!(fs::metadata(&host).unwrap().permissions().mode() & 0o7777, *mode, "{name}");
            assert_eq!(tree.owner(&format!("srv/{name}")), Owner::default());
        }
        // A source that goes away between listing and copying (here: made a dangling link's target).
        fs::remove_file(big.join("f07.bin")).unwrap();
        symlink("/nonexistent/f07", big.join("f07.bin")).unwrap();
        fs::remove_file(big.join("f03.bin")).unwrap();
        fs::create_dir(big.join("f03.bin")).unwrap();
        // On four threads, whatever this machine has; more than the threshold to copy.
        let mut jobs: Vec<(PathBuf, PathBuf, String)> = (8..24)
            .map(|i| (big.join(format!("f{i:02}.bin")), tree.host(&format!("g{i:02}")), format!("g{i:02}")))
            .collect();
        jobs.insert(1, (big.join("f07.bin"), tree.host("g07"), "g07".into()));
        jobs.push((big.join("f03.bin"), tree.host("g03"), "g03".into()));
        let refs: Vec<(&Path, PathBuf, &str)> =
            jobs.iter().map(|(s, d, r)| (s.as_path(), d.clone(), r.as_str())).collect();
        let error = format!("{:#}", copy_files(&refs, 4).unwrap_err());
        assert!(error.contains("f07.bin to /g07"), "the first failure in order is named: {error}");
        // Copied into new files only: one already at a destination is not written through.
        let outside = dir.path().join("outside");
        fs::write(&outside, "kept").unwrap();
        symlink(&outside, tree.host("g30")).unwrap();
        let error = format!("{:#}", copy_files(&[(&big.join("f01.bin"), tree.host("g30"), "g30")], 4).unwrap_err());
        assert!(error.contains("f01.bin to /g30"), "{error}");
        assert_eq!(fs::read_to_string(&outside).unwrap(), "kept");
    }

    /// A link made by the COPY itself (through an alias already in the tree,
    /// `/srv/sub -> .`) cannot stand at a file's destination when its bytes
    /// are written: the result is the old code's, and nothing outside the
    /// tree is written.
    #[test]
    fn a_link_made_during_the_copy_is_never_written_through() {
        let (dir, context, mut tree) = setup();
        let outside = dir.path().join("outside.txt");
        fs::write(&outside, "outside").unwrap();
        let c = dir.path().join("context/c");
        fs::create_dir_all(c.join("sub")).unwrap();
        fs::write(c.join("f"), "file bytes").unwrap();
        symlink(&outside, c.join("sub/f")).unwrap();
        tree.make_dirs("/srv").unwrap();
        symlink(".", tree.host("srv/sub")).unwrap();
        tree.copy(&context, &op(&["c"], "/srv", false), None).unwrap();
        assert_eq!(fs::read_to_string(&outside).unwrap(), "outside", "the copy wrote outside the tree");
        assert_eq!(fs::read_link(tree.host("srv/f")).unwrap(), outside, "the later entry, the link, won");
    }

    #[test]
    fn chmod_applies_and_chown_is_recorded() {
        let (_dir, context, mut tree) = setup();
        write(&tree.host("etc/passwd"), "root:x:0:0::/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n");
        let mut copy = op(&["app"], "/srv", false);
        copy.chmod = Some(0o700);
        copy.chown = Some(Chown { user: "app".into(), group: None });
        tree.copy(&context, &copy, None).unwrap();
        let mode = fs::metadata(tree.host("srv/main.py")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700);
        assert_eq!(tree.owner("srv/main.py"), Owner { uid: 1000, gid: 1001 });
        assert_eq!(tree.owner("srv/lib"), Owner { uid: 1000, gid: 1001 });
        let mut copy = op(&["a.txt"], "/x", false);
        copy.chown = Some(Chown { user: "7".into(), group: None });
        tree.copy(&context, &copy, None).unwrap();
        assert_eq!(tree.owner("x"), Owner { uid: 7, gid: 7 });
        let mut copy = op(&["a.txt"], "/y", false);
        copy.chown = Some(Chown { user: "nobody-here".into(), group: None });
        let stats = tree.copy(&context, &copy, None).unwrap();
        assert_eq!(tree.owner("y"), Owner::default());
        assert!(stats.notes[0].contains("user not found"), "{:?}", stats.notes);
    }

    #[test]
    fn tree_symlinks_resolve_inside_the_tree() {
        let (_dir, context, mut tree) = setup();
        tree.make_dirs("/usr/bin").unwrap();
        symlink("/usr/bin", tree.host("bin")).unwrap();
        symlink("../../../../..", tree.host("usr/up")).unwrap();
        tree.copy(&context, &op(&["a.txt"], "/bin/", true), None).unwrap();
        assert_eq!(read(&tree, "/usr/bin/a.txt"), "a\n");
        assert_eq!(tree.resolve("/usr/up/etc", true).unwrap(), "etc");
        tree.copy(&context, &op(&["a.txt"], "/usr/up/escaped", false), None).unwrap();
        assert!(tree.host("escaped").is_file(), "writes through a climbing symlink stay in the tree");
    }

    #[test]
    fn nested_symlinks_are_copied_as_links() {
        let (_dir, context, mut tree) = setup();
        symlink("/etc/shadow", context.root().join("app/shadow")).unwrap();
        let stats = tree.copy(&context, &op(&["app"], "/srv", false), None).unwrap();
        assert_eq!(stats.symlinks, 1);
        assert_eq!(fs::read_link(tree.host("srv/shadow")).unwrap(), Path::new("/etc/shadow"));
    }

    #[test]
    fn add_refuses_local_archives() {
        let (_dir, context, mut tree) = setup();
        write(&context.root().join("x.tar.gz"), "not really");
        let mut add = op(&["x.tar.gz"], "/x", false);
        add.instruction = "ADD";
        let err = tree.copy(&context, &add, None).unwrap_err().to_string();
        assert!(err.contains("unpacking local archives is not supported"), "{err}");
        let copy = op(&["x.tar.gz"], "/x", false);
        tree.copy(&context, &copy, None).unwrap();
    }

    #[test]
    fn entries_are_sorted_depth_first() {
        let (_dir, context, mut tree) = setup();
        tree.copy(&context, &op(&["."], "/", false), None).unwrap();
        let rels: Vec<String> = tree.entries().unwrap().into_iter().map(|e| e.rel).collect();
        assert_eq!(rels, ["README.md", "a.txt", "app", "app/lib", "app/lib/util.py", "app/main.py", "b.txt"]);
    }
}
