//! Where an image's files are: a directory (an OCI layout on disk) or the
//! members of a tar (a `docker save` archive, a tar of an OCI layout),
//! which may itself be compressed. Members are read by streaming: an
//! uncompressed tar by seeking to the member, a compressed one by reading
//! up to it again.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use tar::EntryType;

/// How a stream is compressed, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

impl Compression {
    /// From magic bytes; bzip2 and xz are named and refused.
    pub fn sniff(head: &[u8]) -> Result<Compression> {
        Ok(match head {
            [0x1f, 0x8b, ..] => Compression::Gzip,
            [0x28, 0xb5, 0x2f, 0xfd, ..] => Compression::Zstd,
            [b'B', b'Z', b'h', ..] => bail!("bzip2-compressed, which is not supported (gzip, zstd or none are)"),
            [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => {
                bail!("xz-compressed, which is not supported (gzip, zstd or none are)")
            }
            _ => Compression::None,
        })
    }

    /// Wraps `reader` in the decoder for this compression.
    pub fn decode<'a, R: Read + 'a>(self, reader: R) -> Result<Box<dyn Read + 'a>> {
        Ok(match self {
            Compression::None => Box::new(reader),
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
            Compression::Zstd => Box::new(zstd::Decoder::new(reader).context("start zstd")?),
        })
    }
}

/// A stream whose first bytes were read ahead and are given back first.
pub type Peeked<R> = io::Chain<io::Cursor<Vec<u8>>, R>;

/// Reads the first bytes of `reader` without losing them.
pub fn peek<R: Read>(reader: R) -> io::Result<(Vec<u8>, Peeked<R>)> {
    let mut head = Vec::with_capacity(8);
    let mut reader = reader;
    (&mut reader).take(8).read_to_end(&mut head)?;
    let cursor = io::Cursor::new(head.clone());
    Ok((head, cursor.chain(reader)))
}

/// A stream that is decompressed as its magic bytes say.
pub fn decompressed<'a, R: Read + 'a>(reader: R) -> Result<(Compression, Box<dyn Read + 'a>)> {
    let (head, reader) = peek(reader)?;
    let compression = Compression::sniff(&head)?;
    Ok((compression, compression.decode(reader)?))
}

#[derive(Debug, Clone)]
enum Member {
    /// Data at `offset` (in the uncompressed tar stream), `size` bytes.
    File {
        offset: u64,
        size: u64,
    },
    /// A symlink or hard link to another member (archive path).
    Link(String),
    Dir,
}

/// The members of a tar, by normalised path.
#[derive(Debug)]
pub struct TarIndex {
    path: PathBuf,
    compression: Compression,
    members: BTreeMap<String, Member>,
}

/// Where an image's files are.
#[derive(Debug)]
pub enum Source {
    Dir(PathBuf),
    Tar(TarIndex),
}

/// `./a//b/` → `a/b`; `None` for a path with `..` or for the root.
pub fn normalise(path: &str) -> Option<String> {
    let mut parts = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => return None,
            part => parts.push(part),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

impl TarIndex {
    /// Lists the members of the tar at `path` (compressed or not).
    pub fn read(path: &Path) -> Result<TarIndex> {
        let file = File::open(path).with_context(|| format!("open {}", path.display()))?;
        let (compression, reader) = decompressed(BufReader::new(file)).with_context(|| path.display().to_string())?;
        let mut archive = tar::Archive::new(reader);
        let mut members = BTreeMap::new();
        let not_tar = |e: io::Error| anyhow!("{} is not a tar archive (nor a gzip or zstd one): {e}", path.display());
        for entry in archive.entries().map_err(not_tar)? {
            let entry = entry.map_err(not_tar)?;
            let raw = entry.path().map_err(not_tar)?;
            let Some(name) = raw.to_str().and_then(normalise) else { continue };
            let member = match entry.header().entry_type() {
                EntryType::Regular | EntryType::Continuous => {
                    Member::File { offset: entry.raw_file_position(), size: entry.size() }
                }
                EntryType::Directory => Member::Dir,
                EntryType::Symlink => {
                    let Some(target) = entry.link_name().map_err(not_tar)? else { continue };
                    let Some(target) = target.to_str() else { continue };
                    let joined = match (target.starts_with('/'), name.rsplit_once('/')) {
                        (false, Some((dir, _))) => format!("{dir}/{target}"),
                        _ => target.to_owned(),
                    };
                    match resolve_dots(&joined) {
                        Some(target) => Member::Link(target),
                        None => continue,
                    }
                }
                EntryType::Link => {
                    let Some(target) = entry.link_name().map_err(not_tar)? else { continue };
                    match target.to_str().and_then(normalise) {
                        Some(target) => Member::Link(target),
                        None => continue,
                    }
                }
                _ => continue,
            };
            members.insert(name, member);
        }
        if members.is_empty() {
            // An empty tar is a valid (empty) rootfs, but an empty file or junk is not a tar.
            let len = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            if len < 1024 && compression == Compression::None {
                bail!("{} is not a tar archive (nor a gzip or zstd one)", path.display());
            }
        }
        Ok(TarIndex { path: path.to_owned(), compression, members })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn contains_file(&self, name: &str) -> bool {
        self.resolve(name).is_ok()
    }

    /// Follows links to a file member: (offset, size).
    fn resolve(&self, name: &str) -> Result<(u64, u64)> {
        let mut current = normalise(name).ok_or_else(|| anyhow!("{name} is not a plain path"))?;
        for _ in 0..16 {
            match self.members.get(&current) {
                Some(Member::File { offset, size }) => return Ok((*offset, *size)),
                Some(Member::Link(target)) => current = target.clone(),
                Some(Member::Dir) => bail!("{name} is a directory in {}", self.path.display()),
                None => bail!("{} has no {name}", self.path.display()),
            }
        }
        bail!("{name} in {} is a loop of links", self.path.display())
    }

    fn open(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64)> {
        let (offset, size) = self.resolve(name)?;
        let mut file = File::open(&self.path).with_context(|| format!("open {}", self.path.display()))?;
        if self.compression == Compression::None {
            file.seek(SeekFrom::Start(offset)).with_context(|| format!("seek in {}", self.path.display()))?;
            return Ok((Box::new(BufReader::new(file).take(size)), size));
        }
        let (_, reader) = peek(BufReader::new(file))?;
        let mut reader: Box<dyn Read + Send> = match self.compression {
            Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(reader)),
            Compression::Zstd => Box::new(zstd::Decoder::new(reader).context("start zstd")?),
            Compression::None => unreachable!(),
        };
        let skipped = io::copy(&mut (&mut reader).take(offset), &mut io::sink())
            .with_context(|| format!("read {}", self.path.display()))?;
        if skipped != offset {
            bail!("{} ended before {name}", self.path.display());
        }
        Ok((Box::new(reader.take(size)), size))
    }
}

/// `a/b/../c` → `a/c`; `None` when `..` leaves the archive.
fn resolve_dots(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            part => parts.push(part),
        }
    }
    (!parts.is_empty()).then(|| parts.join("/"))
}

impl Source {
    /// A file of the image (`blobs/sha256/…`, `manifest.json`): a reader and its size.
    pub fn open(&self, name: &str) -> Result<(Box<dyn Read + Send>, u64)> {
        match self {
            Source::Dir(dir) => {
                let rel = normalise(name).ok_or_else(|| anyhow!("{name} is not a plain path"))?;
                let path = dir.join(rel);
                let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
                let size = file.metadata().with_context(|| format!("stat {}", path.display()))?.len();
                Ok((Box::new(BufReader::new(file)), size))
            }
            Source::Tar(index) => index.open(name),
        }
    }

    pub fn exists(&self, name: &str) -> bool {
        match self {
            Source::Dir(dir) => normalise(name).is_some_and(|rel| dir.join(rel).is_file()),
            Source::Tar(index) => index.contains_file(name),
        }
    }

    /// Reads a small file whole (at most `limit` bytes).
    pub fn read_small(&self, name: &str, limit: u64) -> Result<Vec<u8>> {
        let (reader, size) = self.open(name)?;
        if size > limit {
            bail!("{name} is {size} bytes, more than the {limit} accepted");
        }
        let mut bytes = Vec::with_capacity(size as usize);
        reader.take(limit).read_to_end(&mut bytes).with_context(|| format!("read {name}"))?;
        Ok(bytes)
    }

    /// Where the image is, for messages.
    pub fn display(&self) -> String {
        match self {
            Source::Dir(dir) => dir.display().to_string(),
            Source::Tar(index) => index.path.display().to_string(),
        }
    }
}
