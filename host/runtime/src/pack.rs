//! Packing a build context: a deterministic tar of a directory, gzipped on
//! every core ([`gzip`]) or sent as a plain tar ([`Encoding`]).
//! `sandbox-exec`'s `upload-directory` runs it in the host, natively, for
//! the directory the component names; the component decides what is sent
//! (which directory, which exclusions, where to), the host how the bytes go.
//!
//! Entries are sorted by name, with mtime 0 and owner 0:0, so the same tree
//! packs to the same bytes. Regular files, directories and symlinks (as
//! links, never followed) are sent with their permission bits; sockets,
//! fifos and devices are left out and counted.

pub mod gzip;
pub mod ignore;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

pub use self::gzip::{GzipStats, ParallelGzip};
pub use self::ignore::Patterns;

/// How the tar goes: gzipped, or as it is.
///
/// Compression pays where the link is slower than compressing and
/// unpacking. On one machine it is not: a 300 MB context took 0.34 s to
/// send and 0.34 s to unpack as a plain tar, 0.50 s and 0.75 s as the gzip
/// (docs/figures.md, the data path). So, as Docker's client does with its
/// context (`docker build --compress` is opt-in), a sandbox on this
/// machine gets the plain tar and a remote one the gzip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// A gzip tar (`tar -xzf`): stored blocks for what looks random, a fast
    /// level for the rest, on every core.
    Gzip,
    /// A plain tar (`tar -xf`).
    Tar,
}

/// The blocks a plain tar is sent in.
const TAR_BLOCK: usize = 1 << 20;

/// What [`pack_context`] sent.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Packed {
    /// The gzip figures (bytes in and out, stored and deflated); for a
    /// plain tar, only the bytes in and out.
    pub gzip: GzipStats,
    /// Regular files sent.
    pub files: u64,
    /// Bytes of those files.
    pub file_bytes: u64,
    /// Entries left out because of their type (sockets, fifos, devices), by path.
    pub skipped: Vec<String>,
}

/// Writes the tar of `dir` to `out` as `encoding` says, leaving out what
/// `exclude` (`.dockerignore` patterns) matches. A plain tar reaches `out`
/// in writes of 1 MiB (the last shorter).
pub fn pack_context<W: Write>(dir: &Path, exclude: &Patterns, encoding: Encoding, out: W) -> io::Result<(W, Packed)> {
    let meta = std::fs::metadata(dir).map_err(|e| named(e, "open the directory", dir))?;
    if !meta.is_dir() {
        return Err(io::Error::other(format!("{} is not a directory", dir.display())));
    }
    let mut packed = Packed::default();
    match encoding {
        Encoding::Gzip => {
            let mut tar = tar::Builder::new(ParallelGzip::new(out)?);
            append_tree(&mut tar, dir, "", exclude, &mut packed)?;
            let (out, gzip) = tar.into_inner()?.finish()?;
            packed.gzip = gzip;
            Ok((out, packed))
        }
        Encoding::Tar => {
            let mut tar = tar::Builder::new(Blocks { inner: out, block: Vec::with_capacity(TAR_BLOCK), bytes: 0 });
            append_tree(&mut tar, dir, "", exclude, &mut packed)?;
            let (out, bytes) = tar.into_inner()?.finish()?;
            packed.gzip = GzipStats { bytes_in: bytes, bytes_out: bytes, ..GzipStats::default() };
            Ok((out, packed))
        }
    }
}

/// Hands what is written to `inner` in whole blocks of [`TAR_BLOCK`] bytes.
struct Blocks<W: Write> {
    inner: W,
    block: Vec<u8>,
    bytes: u64,
}

impl<W: Write> Blocks<W> {
    /// Writes the last (short) block; returns the writer and the bytes written.
    fn finish(mut self) -> io::Result<(W, u64)> {
        if !self.block.is_empty() {
            self.inner.write_all(&self.block)?;
        }
        self.inner.flush()?;
        Ok((self.inner, self.bytes))
    }
}

impl<W: Write> Write for Blocks<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        // A full block goes before more is taken, so that a failed write took nothing.
        if self.block.len() == TAR_BLOCK {
            self.inner.write_all(&self.block)?;
            self.block.clear();
        }
        let n = data.len().min(TAR_BLOCK - self.block.len());
        self.block.extend_from_slice(&data[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    /// Sends nothing: blocks go whole, and only [`Blocks::finish`] sends the last, short one.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn append_tree<W: Write>(
    tar: &mut tar::Builder<W>,
    dir: &Path,
    prefix: &str,
    exclude: &Patterns,
    packed: &mut Packed,
) -> io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| named(e, "list", dir))?
        .collect::<Result<_, _>>()
        .map_err(|e| named(e, "list", dir))?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name();
        let name = name
            .to_str()
            .ok_or_else(|| io::Error::other(format!("{} has a name that is not UTF-8", entry.path().display())))?;
        let path = if prefix.is_empty() { name.to_owned() } else { format!("{prefix}/{name}") };
        let full = entry.path();
        let meta = std::fs::symlink_metadata(&full).map_err(|e| named(e, "stat", &full))?;
        let kind = meta.file_type();
        if exclude.excludes(&path) {
            // Left out, but an exception may name something inside: enter it without its own entry.
            if kind.is_dir() && exclude.has_exception_below(&path) {
                append_tree(tar, &full, &path, exclude, packed)?;
            }
            continue;
        }
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_mode(meta.mode() & 0o7777);
        if kind.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_size(0);
            tar.append_data(&mut header, format!("{path}/"), io::empty())?;
            append_tree(tar, &full, &path, exclude, packed)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(&full).map_err(|e| named(e, "read the link", &full))?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_size(0);
            tar.append_link(&mut header, &path, target)?;
        } else if kind.is_file() {
            let file = File::open(&full).map_err(|e| named(e, "open", &full))?;
            let size = meta.len();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(size);
            tar.append_data(&mut header, &path, Exact { file, left: size, path: &full })?;
            packed.files += 1;
            packed.file_bytes += size;
        } else if kind.is_socket() || kind.is_fifo() || kind.is_block_device() || kind.is_char_device() {
            packed.skipped.push(path);
        }
    }
    Ok(())
}

/// A file read for exactly the size its header declares: one that shrinks
/// while it is read fails the archive instead of corrupting it.
struct Exact<'a> {
    file: File,
    left: u64,
    path: &'a Path,
}

impl Read for Exact<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let n = self.file.read(&mut buf[..want]).map_err(|e| named(e, "read", self.path))?;
        if n == 0 {
            return Err(io::Error::other(format!(
                "{} shrank while it was being packed ({} bytes short); pack again once it is not being written",
                self.path.display(),
                self.left
            )));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

fn named(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    /// An unpacked entry: path, type, mode, bytes, link target.
    type Unpacked = (String, tar::EntryType, u32, Vec<u8>, Option<String>);

    fn unpack(gz: &[u8]) -> Vec<Unpacked> {
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(gz));
        archive
            .entries()
            .unwrap()
            .map(|entry| {
                let mut entry = entry.unwrap();
                let path = entry.path().unwrap().to_string_lossy().into_owned();
                let kind = entry.header().entry_type();
                let mode = entry.header().mode().unwrap();
                let link = entry.link_name().unwrap().map(|l| l.to_string_lossy().into_owned());
                let mut data = Vec::new();
                entry.read_to_end(&mut data).unwrap();
                (path, kind, mode, data, link)
            })
            .collect()
    }

    #[test]
    fn a_tree_packs_sorted_with_modes_links_and_exclusions() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("app/lib")).unwrap();
        std::fs::create_dir_all(root.join(".git/objects")).unwrap();
        std::fs::write(root.join(".git/objects/x"), "secret history").unwrap();
        std::fs::write(root.join("app/run.sh"), "#!/bin/sh\necho hi\n").unwrap();
        std::fs::set_permissions(root.join("app/run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(root.join("app/lib/util.py"), "x = 1\n").unwrap();
        std::fs::write(root.join("b.txt"), "b").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).unwrap();
        let fifo = std::ffi::CString::new(root.join("pipe").to_str().unwrap()).unwrap();
        // SAFETY: mkfifo(3) with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        let exclude = Patterns::new(&["./.git".into()]).unwrap();
        let (gz, packed) = pack_context(root, &exclude, Encoding::Gzip, Vec::new()).unwrap();
        let entries = unpack(&gz);
        let names: Vec<&str> = entries.iter().map(|e| e.0.as_str()).collect();
        assert_eq!(names, ["app/", "app/lib/", "app/lib/util.py", "app/run.sh", "b.txt", "link"]);
        let run = &entries[3];
        assert_eq!((run.2 & 0o777, run.3.as_slice()), (0o755, &b"#!/bin/sh\necho hi\n"[..]));
        assert_eq!(entries[5].1, tar::EntryType::Symlink);
        assert_eq!(entries[5].4.as_deref(), Some("/etc/passwd"), "links are sent as links, not followed");
        assert_eq!((packed.files, packed.file_bytes), (3, 6 + 18 + 1));
        assert_eq!(packed.skipped, ["pipe"]);
        // The same tree packs to the same bytes.
        let (again, _) = pack_context(root, &exclude, Encoding::Gzip, Vec::new()).unwrap();
        assert_eq!(gz, again);
    }

    /// GNU tar unpacks both encodings byte for byte: `tar -xzf` through the
    /// system's gzip (not the builder's) a stream that mixes stored and
    /// deflated blocks over several workers' blocks, `tar -xf` the plain tar.
    #[test]
    fn gnu_tar_unpacks_both_encodings_byte_for_byte() {
        let dir = tempfile::tempdir().unwrap();
        let context = dir.path().join("context");
        std::fs::create_dir_all(context.join("sub")).unwrap();
        let random = snapsign_rootfs_builder::sample::random((3 << 20) + 17, 0x2545_f491_4f6c_dd1d);
        let text = snapsign_rootfs_builder::sample::text(4 << 20);
        std::fs::write(context.join("random.bin"), &random).unwrap();
        std::fs::write(context.join("sub/text.txt"), &text).unwrap();
        let (gz, packed) = pack_context(&context, &Patterns::default(), Encoding::Gzip, Vec::new()).unwrap();
        assert!(packed.gzip.stored >= 3 << 20 && packed.gzip.deflated > text.len() as u64, "{packed:?}");
        let (plain, packed) = pack_context(&context, &Patterns::default(), Encoding::Tar, Vec::new()).unwrap();
        assert_eq!((packed.gzip.bytes_out, packed.gzip.stored, packed.gzip.deflated), (plain.len() as u64, 0, 0));
        for (name, bytes, flag) in [("context.tar.gz", &gz, "-xzf"), ("context.tar", &plain, "-xf")] {
            let archive = dir.path().join(name);
            std::fs::write(&archive, bytes).unwrap();
            let out = dir.path().join(format!("out-{name}"));
            std::fs::create_dir(&out).unwrap();
            let output = std::process::Command::new("tar")
                .arg(flag)
                .arg(&archive)
                .arg("-C")
                .arg(&out)
                .env("PATH", "/usr/bin:/bin")
                .output()
                .unwrap();
            assert!(output.status.success(), "{name}: {}", String::from_utf8_lossy(&output.stderr));
            assert!(std::fs::read(out.join("random.bin")).unwrap() == random, "{name}");
            assert!(std::fs::read(out.join("sub/text.txt")).unwrap() == text, "{name}");
        }
        let archive = dir.path().join("context.tar.gz");
        let gzip = std::process::Command::new("gzip").arg("-t").arg(&archive).env("PATH", "/usr/bin:/bin").output();
        assert!(gzip.unwrap().status.success(), "gzip -t accepts the stream");
        // The same archive either way: the gzip stream holds the plain tar.
        let mut gunzipped = Vec::new();
        flate2::read::GzDecoder::new(gz.as_slice()).read_to_end(&mut gunzipped).unwrap();
        assert!(gunzipped == plain, "the gzip holds another tar than the plain one");
    }

    /// A plain tar reaches its writer in blocks of 1 MiB, not in the tar
    /// builder's header and 8 KiB writes.
    #[test]
    fn a_plain_tar_is_written_in_blocks_of_one_mib() {
        struct Sizes(Vec<usize>);
        impl Write for Sizes {
            fn write(&mut self, data: &[u8]) -> io::Result<usize> {
                self.0.push(data.len());
                Ok(data.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let dir = tempfile::tempdir().unwrap();
        for i in 0..40 {
            std::fs::write(dir.path().join(format!("f{i:02}")), vec![i as u8; 100_000 + i]).unwrap();
        }
        let (sizes, packed) = pack_context(dir.path(), &Patterns::default(), Encoding::Tar, Sizes(Vec::new())).unwrap();
        let (last, full) = sizes.0.split_last().unwrap();
        assert!(full.iter().all(|&n| n == TAR_BLOCK) && *last <= TAR_BLOCK, "{:?}", sizes.0);
        assert_eq!(sizes.0.iter().sum::<usize>() as u64, packed.gzip.bytes_out);
        assert_eq!(packed.files, 40);
    }

    /// Docker's rule for a left-out directory: not entered, unless an
    /// exception names something inside it; then only that is sent.
    #[test]
    fn dockerignore_patterns_leave_out_trees_and_exceptions_reach_inside_them() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (path, text) in [
            ("node_modules/lib/x.js", "x"),
            ("node_modules/keep/me.js", "me"),
            ("src/main.rs", "fn main() {}"),
            ("src/main.rs.bak", "old"),
            ("notes.md", "n"),
            ("README.md", "r"),
        ] {
            std::fs::create_dir_all(root.join(path).parent().unwrap()).unwrap();
            std::fs::write(root.join(path), text).unwrap();
        }
        let lines = ["# build context", "node_modules", "!node_modules/keep/me.js", "**/*.bak", "*.md", "!README.md"];
        let exclude = Patterns::new(&lines.map(str::to_owned)).unwrap();
        let (gz, packed) = pack_context(root, &exclude, Encoding::Gzip, Vec::new()).unwrap();
        let names: Vec<String> = unpack(&gz).into_iter().map(|e| e.0).collect();
        assert_eq!(names, ["README.md", "node_modules/keep/me.js", "src/", "src/main.rs"]);
        assert_eq!(packed.files, 3);
    }

    #[test]
    fn a_file_that_is_not_a_directory_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("f"), "x").unwrap();
        let none = Patterns::default();
        let error = pack_context(&dir.path().join("f"), &none, Encoding::Tar, Vec::new()).unwrap_err().to_string();
        assert!(error.contains("is not a directory"), "{error}");
        let error = pack_context(&dir.path().join("missing"), &none, Encoding::Gzip, Vec::new()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::NotFound);
    }
}
