//! Multipart uploads as S3 runs them, over s3s-fs's files (see `layout`).
//!
//! s3s-fs's own CompleteMultipartUpload deleted the upload record first,
//! accepted any ETag, wanted parts numbered 1..n, and deleted parts while it
//! assembled: a failed or killed complete left parts nobody could abort. Ours:
//!
//! - **InvalidPartOrder** (400) unless part numbers ascend strictly;
//! - **InvalidPart** (400) when a listed part was not uploaded or its ETag
//!   is not the MD5 of what was uploaded; parts need not be contiguous (S3
//!   completes 1 and 3 of 3 and discards part 2);
//! - **EntityTooSmall** (400) when a part other than the last listed is
//!   under 5 MiB;
//! - the object is assembled in a temporary file and renamed into place; the
//!   upload record is dropped only after that, then the parts. Until then the
//!   upload can be completed again or aborted; a killed store's temporary
//!   file is removed by s3s-fs when it reopens the root;
//! - **NoSuchUpload** (404) for an upload that was completed, aborted or
//!   never existed (s3s-fs said 403).
//!
//! Complete, abort and the reaper hold an upload's lock exclusively; an
//! UploadPart takes it shared only to check, after writing, that the upload
//! still exists (else it removes its part), so a slow part never blocks them.
//!
//! **Part records.** UploadPart keeps the MD5 s3s-fs computed as it wrote
//! the part (its ETag), with the identity of the file it wrote (device,
//! inode, size, mtime and ctime: s3s-fs writes a part to a temporary file
//! and renames it in, so a part uploaded again is another file). Complete
//! trusts a record only for the very file it opened, and computes the MD5
//! of any other part, so a part is read once at complete, not twice. Uploads
//! of one part number run one at a time, each in a task of its own that a
//! client hanging up does not cancel, and each drops the part's record
//! before it writes, so a record always names the file its MD5 was computed
//! from; records live in memory (a restarted store computes every MD5
//! again). One upload of a part that stalls holds back later uploads of the
//! same part number of the same upload (only the holder of that URL's
//! upload id can send them), never a complete or an abort.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime};

use s3s::crypto::{Checksum, Md5};
use s3s::{S3Error, s3_error};
use sha2::{Digest as _, Sha256};
use tokio::sync::RwLock;
use uuid::Uuid;

use super::layout::Layout;

/// S3's smallest part other than the last.
pub const MIN_PART_BYTES: u64 = 5 * 1024 * 1024;
/// S3's part numbers run from 1 to this.
pub const MAX_PART_NUMBER: i32 = 10_000;

/// The open uploads of one store root.
#[derive(Debug)]
pub struct Uploads {
    layout: Layout,
    locks: Mutex<HashMap<Uuid, Weak<RwLock<()>>>>,
    /// One UploadPart at a time per part number (see the module).
    part_locks: Mutex<HashMap<(Uuid, i32), Weak<PartLock>>>,
    /// What UploadPart recorded of each part.
    part_records: Mutex<HashMap<(Uuid, i32), PartRecord>>,
}

/// Held by one UploadPart of a part number at a time.
type PartLock = tokio::sync::Mutex<()>;

/// The MD5 of a part, and the file it was computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PartRecord {
    file: FileId,
    md5: [u8; 16],
}

/// Which file, as it was: a file replaced, rewritten or touched is another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileId {
    fn of(meta: &fs::Metadata) -> FileId {
        FileId {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A CompleteMultipartUpload to run.
#[derive(Debug, Clone)]
pub struct Complete {
    /// Upload id as sent.
    pub upload_id: String,
    /// Bucket.
    pub bucket: String,
    /// Key.
    pub key: String,
    /// Access key of the request.
    pub access_key: Option<String>,
    /// Parts as listed: number and ETag.
    pub parts: Vec<(Option<i32>, Option<String>)>,
}

/// An upload the reaper aborted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaped {
    /// Its id.
    pub upload_id: Uuid,
    /// Bucket and key, when its attributes file names them.
    pub object: Option<(String, String)>,
    /// How old it was.
    pub age: Duration,
    /// Part files removed.
    pub parts: usize,
}

impl Uploads {
    /// Removes the object's recorded info (s3s-fs's, with the digest a
    /// complete recorded) before a PutObject: s3s-fs moves the new bytes in
    /// place before it checks `Content-MD5`, and writes its info only when
    /// that passes, so a refused PUT would leave the old record on the new bytes.
    pub(super) fn forget_record(&self, bucket: &str, key: &str) -> Result<(), S3Error> {
        match fs::remove_file(self.layout.internal_info(bucket, key)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(internal(&format!("remove the recorded info of {bucket}/{key}"), e))
            }
            _ => Ok(()),
        }
    }

    /// Uploads under `layout`'s root.
    pub fn new(layout: Layout) -> Self {
        Uploads {
            layout,
            locks: Mutex::new(HashMap::new()),
            part_locks: Mutex::new(HashMap::new()),
            part_records: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self, id: Uuid) -> Arc<RwLock<()>> {
        let mut locks = self.locks.lock().expect("upload locks poisoned");
        if let Some(lock) = locks.get(&id).and_then(Weak::upgrade) {
            return lock;
        }
        locks.retain(|_, weak| weak.strong_count() > 0);
        let lock = Arc::new(RwLock::new(()));
        locks.insert(id, Arc::downgrade(&lock));
        lock
    }

    /// The lock that makes UploadParts of one part number run one at a time;
    /// hold it from before s3s-fs writes the part until [`Uploads::part_written`].
    pub fn part_lock(&self, id: Uuid, part: i32) -> Arc<PartLock> {
        let mut locks = self.part_locks.lock().expect("part locks poisoned");
        if let Some(lock) = locks.get(&(id, part)).and_then(Weak::upgrade) {
            return lock;
        }
        locks.retain(|_, weak| weak.strong_count() > 0);
        let lock = Arc::new(PartLock::new(()));
        locks.insert((id, part), Arc::downgrade(&lock));
        lock
    }

    /// The upload id as s3s-fs reads it; one it cannot read names no upload.
    pub fn parse_id(raw: &str) -> Result<Uuid, S3Error> {
        Uuid::parse_str(raw).map_err(|_| no_such_upload(raw))
    }

    /// NoSuchUpload unless the upload is open and was made for object
    /// `bucket`/`key` (as S3 ties an upload id to its key: a URL signed for
    /// one key cannot reach an upload of another), AccessDenied if another
    /// access key opened it.
    pub fn check_open(&self, id: &Uuid, access_key: Option<&str>, bucket: &str, key: &str) -> Result<(), S3Error> {
        // s3s-fs writes the upload's attributes at CreateMultipartUpload under its bucket and key.
        if !self.layout.upload_attrs(bucket, key, id).exists() {
            return Err(no_such_upload(&id.to_string()));
        }
        let path = self.layout.record(id);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(no_such_upload(&id.to_string())),
            Err(e) => return Err(internal(&format!("read upload record {}", path.display()), e)),
        };
        let owner: Option<String> = serde_json::from_slice(&bytes)
            .map_err(|e| internal(&format!("parse upload record {}", path.display()), e))?;
        if owner.as_deref() != access_key {
            return Err(s3_error!(AccessDenied, "upload {id} belongs to another access key"));
        }
        Ok(())
    }

    /// After s3s-fs wrote part `part` with ETag `etag` (its MD5, in hex):
    /// records it for complete, or, if the upload was completed or aborted
    /// meanwhile, removes the part and answers NoSuchUpload. The caller holds
    /// [`Uploads::part_lock`], so the file at the part's path is the one written.
    pub async fn part_written(&self, id: Uuid, part: i32, etag: Option<&str>) -> Result<(), S3Error> {
        let lock = self.lock(id);
        let _shared = lock.read().await;
        if self.layout.record(&id).exists() {
            self.record_part(id, part, etag);
            return Ok(());
        }
        let path = self.layout.part(&id, part);
        if let Err(e) = fs::remove_file(&path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            return Err(internal(&format!("remove late part {}", path.display()), e));
        }
        Err(no_such_upload(&id.to_string()))
    }

    /// Drops what was recorded of part `part`, before it is uploaded again:
    /// an upload that ends half way then leaves no record to trust.
    pub fn forget_part(&self, id: Uuid, part: i32) {
        self.part_records.lock().expect("part records poisoned").remove(&(id, part));
    }

    /// Keeps part `part`'s MD5 with the identity of the file now at its path;
    /// keeps nothing (complete then computes it) when either cannot be read.
    fn record_part(&self, id: Uuid, part: i32, etag: Option<&str>) {
        let mut records = self.part_records.lock().expect("part records poisoned");
        records.remove(&(id, part));
        let md5 = etag.and_then(|e| hex::decode(e.trim_matches('"')).ok()).and_then(|b| <[u8; 16]>::try_from(b).ok());
        if let (Some(md5), Ok(meta)) = (md5, fs::metadata(self.layout.part(&id, part))) {
            records.insert((id, part), PartRecord { file: FileId::of(&meta), md5 });
        }
    }

    /// The recorded MD5 of part `part` when `file` (opened at its path) is the file it was computed from.
    fn recorded_md5(&self, id: Uuid, part: i32, file: &File) -> Option<[u8; 16]> {
        let record = *self.part_records.lock().expect("part records poisoned").get(&(id, part))?;
        let meta = file.metadata().ok()?;
        (record.file == FileId::of(&meta)).then_some(record.md5)
    }

    /// CompleteMultipartUpload; returns the multipart ETag (`md5-of-md5s-N`).
    pub async fn complete(self: &Arc<Self>, request: Complete) -> Result<String, S3Error> {
        let id = Self::parse_id(&request.upload_id)?;
        let parts = listed_parts(&request.parts)?;
        let lock = self.lock(id);
        let uploads = self.clone();
        // Its own task: a client that hangs up does not stop a complete half way.
        let task = tokio::spawn(async move {
            let exclusive = lock.write_owned().await;
            tokio::task::spawn_blocking(move || {
                let _exclusive = exclusive;
                uploads.check_open(&id, request.access_key.as_deref(), &request.bucket, &request.key)?;
                uploads.assemble(&id, &request.bucket, &request.key, &parts)
            })
            .await
            .map_err(|e| internal("run CompleteMultipartUpload", e))?
        });
        task.await.map_err(|e| internal("run CompleteMultipartUpload", e))?
    }

    /// AbortMultipartUpload: parts, attributes and temporary files go, the record last.
    pub async fn abort(
        self: &Arc<Self>,
        upload_id: &str,
        access_key: Option<&str>,
        (bucket, key): (&str, &str),
    ) -> Result<usize, S3Error> {
        let id = Self::parse_id(upload_id)?;
        let lock = self.lock(id);
        let uploads = self.clone();
        let access_key = access_key.map(str::to_owned);
        let (bucket, key) = (bucket.to_owned(), key.to_owned());
        let task = tokio::spawn(async move {
            let exclusive = lock.write_owned().await;
            tokio::task::spawn_blocking(move || {
                let _exclusive = exclusive;
                uploads.check_open(&id, access_key.as_deref(), &bucket, &key)?;
                uploads.remove_upload(&id).map(|(parts, _)| parts)
            })
            .await
            .map_err(|e| internal("run AbortMultipartUpload", e))?
        });
        task.await.map_err(|e| internal("run AbortMultipartUpload", e))?
    }

    /// S3's AbortIncompleteMultipartUpload lifecycle rule: aborts every upload
    /// initiated more than `age` before `now`, and removes part files older
    /// than `age` whose upload record is gone (left by s3s-fs's own complete).
    pub async fn reap(self: &Arc<Self>, age: Duration, now: SystemTime) -> Result<Vec<Reaped>, S3Error> {
        let uploads = self.clone();
        let Stale { records, orphan_parts } = tokio::task::spawn_blocking(move || uploads.old_files(age, now))
            .await
            .map_err(|e| internal("scan for abandoned uploads", e))??;
        let mut reaped = Vec::new();
        for (id, initiated) in records {
            let lock = self.lock(id);
            let exclusive = lock.write_owned().await;
            let uploads = self.clone();
            let removed = tokio::task::spawn_blocking(move || {
                let _exclusive = exclusive;
                // Completed or aborted while we waited for the lock.
                if !uploads.layout.record(&id).exists() {
                    return Ok(None);
                }
                uploads.remove_upload(&id).map(Some)
            })
            .await
            .map_err(|e| internal("abort an abandoned upload", e))??;
            if let Some((parts, object)) = removed {
                let age = now.duration_since(initiated).unwrap_or_default();
                reaped.push(Reaped { upload_id: id, object, age, parts });
            }
        }
        for (id, path) in orphan_parts {
            let lock = self.lock(id);
            let _exclusive = lock.write().await;
            if !self.layout.record(&id).exists() && fs::remove_file(&path).is_ok() {
                tracing::info!(upload_id = %id, path = %path.display(), "store: removed a part file without an upload");
            }
        }
        Ok(reaped)
    }

    fn old_files(&self, age: Duration, now: SystemTime) -> Result<Stale, S3Error> {
        let root = self.layout.root();
        let entries = fs::read_dir(root).map_err(|e| internal(&format!("list {}", root.display()), e))?;
        let (mut records, mut parts) = (Vec::new(), Vec::new());
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else { continue };
            let old = now.duration_since(modified).is_ok_and(|elapsed| elapsed >= age);
            if let Some(id) = Layout::parse_record(&name) {
                // The record is written once, at CreateMultipartUpload: its mtime is the initiation.
                if old {
                    records.push((id, modified));
                }
            } else if let Some(id) = Layout::parse_part(&name)
                && old
            {
                parts.push((id, entry.path()));
            }
        }
        parts.retain(|(id, _)| !self.layout.record(id).exists());
        Ok(Stale { records, orphan_parts: parts })
    }

    /// Removes an upload's parts, attributes and temporary files, then its record.
    /// Returns the parts removed and the object it was for.
    fn remove_upload(&self, id: &Uuid) -> Result<(usize, Option<(String, String)>), S3Error> {
        self.part_records.lock().expect("part records poisoned").retain(|(upload, _), _| upload != id);
        let root = self.layout.root();
        let part_prefix = Layout::part_prefix(id);
        let attrs_suffix = Layout::upload_attrs_suffix(id);
        let temp_suffix = format!("-{id}.internal.part");
        let (mut parts, mut object) = (0, None);
        let entries = fs::read_dir(root).map_err(|e| internal(&format!("list {}", root.display()), e))?;
        for entry in entries.flatten() {
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else { continue };
            let is_part = name.starts_with(&part_prefix);
            let is_attrs = name.starts_with(".bucket-") && name.ends_with(&attrs_suffix);
            let is_temp = name.starts_with(".tmp.") && name.ends_with(&temp_suffix);
            if !(is_part || is_attrs || is_temp) {
                continue;
            }
            if is_attrs {
                object = Layout::parse_upload_attrs(&name, id);
            }
            match fs::remove_file(entry.path()) {
                Ok(()) => parts += usize::from(is_part),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(internal(&format!("remove {}", entry.path().display()), e)),
            }
        }
        let record = self.layout.record(id);
        match fs::remove_file(&record) {
            Ok(()) => Ok((parts, object)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((parts, object)),
            Err(e) => Err(internal(&format!("remove upload record {}", record.display()), e)),
        }
    }

    /// Builds the object from `parts` in a temporary file, checking each
    /// part's ETag as it goes, then moves it into place and drops the upload.
    fn assemble(&self, id: &Uuid, bucket: &str, key: &str, parts: &[(i32, String)]) -> Result<String, S3Error> {
        let started = std::time::Instant::now();
        let layout = &self.layout;
        if !layout.root().join(bucket).is_dir() {
            return Err(s3_error!(NoSuchBucket, "The specified bucket does not exist: {bucket:?}"));
        }
        let last = parts.len() - 1;
        // Each part is opened once: its size rule, its ETag check and the copy
        // all read that file, even if the same part number is uploaded again
        // meanwhile (s3s-fs renames the new file in; the open one stays).
        let mut files = Vec::with_capacity(parts.len());
        for (i, (number, _)) in parts.iter().enumerate() {
            let path = layout.part(id, *number);
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    return Err(invalid_part(*number, "was not uploaded"));
                }
                Err(e) => return Err(internal(&format!("open part {}", path.display()), e)),
            };
            let size = file.metadata().map_err(|e| internal(&format!("stat part {}", path.display()), e))?.len();
            files.push(file);
            if i != last && size < MIN_PART_BYTES {
                return Err(s3_error!(
                    EntityTooSmall,
                    "Your proposed upload is smaller than the minimum allowed object size: part {number} is {size} \
                     bytes; every part but the last must be at least {MIN_PART_BYTES}"
                ));
            }
        }

        let temps = Temps(vec![layout.temp(id, "complete"), layout.temp(id, "complete-info")]);
        let mut out = File::create(&temps.0[0]).map_err(|e| internal("create the object's temporary file", e))?;
        // The kernel copies the parts into the object (copy_file_range, no
        // pass through this process) while a second thread hashes the object
        // (sha256, recorded for `Records`) and a third computes the MD5 of
        // each part UploadPart left no record of, all reading the same bytes
        // from the page cache.
        let recorded: Vec<Option<[u8; 16]>> =
            parts.iter().zip(&files).map(|((number, _), file)| self.recorded_md5(*id, *number, file)).collect();
        let unrecorded: Vec<&File> =
            files.iter().zip(&recorded).filter(|(_, md5)| md5.is_none()).map(|(file, _)| file).collect();
        let (copied, hashed, computed) = std::thread::scope(|scope| {
            let panicked = |what: &str| internal(what, "the thread panicked");
            let md5s = scope.spawn(|| part_md5s(&unrecorded));
            let sha256 = scope.spawn(|| hash_parts(&files));
            let copied = copy_parts(parts, &files, &mut out);
            (
                copied,
                sha256.join().unwrap_or_else(|_| Err(panicked("hash the object"))),
                md5s.join().unwrap_or_else(|_| Err(panicked("check the parts' ETags"))),
            )
        });
        let computed = computed?;
        let computed_count = computed.len();
        let mut computed = computed.into_iter();
        let digests: Vec<Vec<u8>> = recorded
            .into_iter()
            .map(|md5| md5.map(|m| m.to_vec()).or_else(|| computed.next()).unwrap_or_default())
            .collect();
        let (size, (hashed_size, sha256)) = (copied?, hashed?);
        if size != hashed_size {
            let what = format!("assemble the object of upload {id}");
            return Err(internal(&what, format!("copied {size} bytes of its parts but hashed {hashed_size}")));
        }
        let mut md5_of_md5s = Md5::new();
        for ((number, etag), digest) in parts.iter().zip(&digests) {
            if hex::encode(digest) != *etag {
                return Err(invalid_part(*number, &format!("has ETag \"{}\", not \"{etag}\"", hex::encode(digest))));
            }
            md5_of_md5s.update(digest);
        }
        out.flush().map_err(|e| internal("write the object's temporary file", e))?;
        drop(out);
        let etag = format!("{}-{}", hex::encode(md5_of_md5s.finalize()), parts.len());
        let info = serde_json::json!({ "e_tag": etag, RECORD_SHA256: sha256, RECORD_SIZE: size }).to_string();
        fs::write(&temps.0[1], info).map_err(|e| internal("write the object's temporary info", e))?;

        // From here on the object is replaced; the record stays until it is.
        let object = layout.object(bucket, key);
        if let Some(dir) = object.parent() {
            fs::create_dir_all(dir).map_err(|e| internal(&format!("create {}", dir.display()), e))?;
        }
        fs::rename(&temps.0[0], &object)
            .map_err(|e| internal(&format!("move the object to {}", object.display()), e))?;
        let info = layout.internal_info(bucket, key);
        fs::rename(&temps.0[1], &info).map_err(|e| internal(&format!("move {}", info.display()), e))?;
        let (upload_attrs, object_attrs) = (layout.upload_attrs(bucket, key, id), layout.object_attrs(bucket, key));
        let moved = match fs::rename(&upload_attrs, &object_attrs) {
            Ok(()) => Ok(()),
            // No attributes were given: the old object's must not outlive it.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => match fs::remove_file(&object_attrs) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            Err(e) => Err(e),
        };
        moved.map_err(|e| internal(&format!("move attributes to {}", object_attrs.display()), e))?;
        self.remove_upload(id)?;
        tracing::debug!(
            upload_id = %id,
            parts = parts.len(),
            md5_computed = computed_count,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "store: upload completed"
        );
        Ok(etag)
    }
}

/// Keys of the object's internal info (s3s-fs's `.internal.json`, beside
/// its `e_tag`) where a completed upload records the object's sha256 and
/// size. s3s-fs writes a fresh info on every PutObject or CopyObject, so a
/// record never outlives the bytes it describes.
pub(super) const RECORD_SHA256: &str = "snapsign_sha256";
pub(super) const RECORD_SIZE: &str = "snapsign_size";

/// What a completed multipart upload recorded of object `key`: (size, hex
/// sha256), when the object is still that size (else it was replaced
/// outside the store's own calls, and the record is not trusted).
pub fn recorded_digest(root: &std::path::Path, bucket: &str, key: &str) -> Option<(u64, String)> {
    super::keys::check(bucket, key).ok()?;
    let layout = Layout::new(root).ok()?;
    let info: serde_json::Value = serde_json::from_slice(&fs::read(layout.internal_info(bucket, key)).ok()?).ok()?;
    let sha256 = info.get(RECORD_SHA256)?.as_str()?.to_owned();
    let size = info.get(RECORD_SIZE)?.as_u64()?;
    let on_disk = fs::metadata(layout.object(bucket, key)).ok()?.len();
    (on_disk == size && sha256.len() == 64).then_some((size, sha256))
}

/// Copies the opened parts in order into `out` (std's copy between files
/// is the kernel's copy_file_range on Linux); returns the bytes copied.
fn copy_parts(parts: &[(i32, String)], files: &[File], out: &mut File) -> Result<u64, S3Error> {
    let mut size = 0u64;
    for ((number, _), file) in parts.iter().zip(files) {
        // Opened for this complete, so at offset 0: the other passes read at offsets.
        size += std::io::copy(&mut &*file, out)
            .map_err(|e| internal(&format!("copy part {number} into the object's temporary file"), e))?;
    }
    Ok(size)
}

/// The object's sha256, read from the opened parts in order: (size, hex sha256).
fn hash_parts(files: &[File]) -> Result<(u64, String), S3Error> {
    let mut sha256 = Sha256::new();
    let mut size = 0u64;
    let mut buf = vec![0u8; 1024 * 1024];
    for file in files {
        read_all(file, &mut buf, |chunk| {
            sha256.update(chunk);
            size += chunk.len() as u64;
            Ok(())
        })?;
    }
    Ok((size, hex::encode(sha256.finalize())))
}

/// The MD5 of each opened part, in order; the parts are shared between two
/// threads (MD5 runs at about 600 MB/s on one core, the slowest pass of a complete).
fn part_md5s(files: &[&File]) -> Result<Vec<Vec<u8>>, S3Error> {
    let (first, second) = files.split_at(files.len() / 2);
    let (first, second) = std::thread::scope(|scope| {
        let other = scope.spawn(|| part_md5s_of(second));
        let mine = part_md5s_of(first);
        (mine, other.join().unwrap_or_else(|_| Err(internal("check the parts' ETags", "the thread panicked"))))
    });
    let mut digests = first?;
    digests.extend(second?);
    Ok(digests)
}

fn part_md5s_of(files: &[&File]) -> Result<Vec<Vec<u8>>, S3Error> {
    let mut buf = vec![0u8; 1024 * 1024];
    files
        .iter()
        .map(|file| {
            let mut md5 = Md5::new();
            read_all(file, &mut buf, |chunk| {
                md5.update(chunk);
                Ok(())
            })?;
            Ok(md5.finalize().as_ref().to_vec())
        })
        .collect()
}

/// Reads `file` from its start with positioned reads (the same open file is
/// read by two threads at once), handing each chunk to `each`.
fn read_all(file: &File, buf: &mut [u8], mut each: impl FnMut(&[u8]) -> Result<(), S3Error>) -> Result<(), S3Error> {
    use std::os::unix::fs::FileExt;
    let mut offset = 0u64;
    loop {
        let n = match file.read_at(buf, offset) {
            Ok(0) => return Ok(()),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(internal("read a part", e)),
        };
        each(&buf[..n])?;
        offset += n as u64;
    }
}

/// Checks the listed parts as S3 does before reading any: numbered, in
/// strictly ascending order, each with an ETag.
fn listed_parts(listed: &[(Option<i32>, Option<String>)]) -> Result<Vec<(i32, String)>, S3Error> {
    if listed.is_empty() {
        return Err(s3_error!(MalformedXML, "CompleteMultipartUpload names no part; list at least one"));
    }
    let mut parts: Vec<(i32, String)> = Vec::with_capacity(listed.len());
    for (number, etag) in listed {
        let Some(number) = *number else {
            return Err(s3_error!(MalformedXML, "a Part of CompleteMultipartUpload has no PartNumber"));
        };
        if !(1..=MAX_PART_NUMBER).contains(&number) {
            return Err(s3_error!(
                InvalidArgument,
                "Part number must be an integer between 1 and {MAX_PART_NUMBER}, inclusive (got {number})"
            ));
        }
        let Some(etag) = etag else {
            return Err(s3_error!(MalformedXML, "part {number} of CompleteMultipartUpload has no ETag"));
        };
        if parts.last().is_some_and(|(previous, _)| *previous >= number) {
            return Err(s3_error!(
                InvalidPartOrder,
                "The list of parts was not in ascending order. The parts list must be specified in order by part \
                 number (part {number} follows part {}).",
                parts.last().map_or(0, |p| p.0)
            ));
        }
        parts.push((number, etag.trim().trim_matches('"').to_ascii_lowercase()));
    }
    Ok(parts)
}

/// What the reaper found older than its age.
struct Stale {
    /// Upload records and when they were written (the upload's initiation).
    records: Vec<(Uuid, SystemTime)>,
    /// Part files whose upload record is gone.
    orphan_parts: Vec<(Uuid, PathBuf)>,
}

/// Temporary files removed unless they were renamed away.
struct Temps(Vec<PathBuf>);

impl Drop for Temps {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = fs::remove_file(path);
        }
    }
}

fn invalid_part(number: i32, why: &str) -> S3Error {
    s3_error!(
        InvalidPart,
        "One or more of the specified parts could not be found. The part may not have been uploaded, or the \
         specified entity tag may not have matched the part's entity tag: part {number} {why}."
    )
}

fn no_such_upload(id: &str) -> S3Error {
    s3_error!(
        NoSuchUpload,
        "The specified upload does not exist. The upload ID may be invalid, or the upload may have been aborted \
         or completed (upload id {id:?})."
    )
}

/// The detail goes to the log; the caller learns only that the store failed.
fn internal(what: &str, e: impl std::fmt::Display) -> S3Error {
    tracing::error!("store: {what}: {e}");
    s3_error!(InternalError, "We encountered an internal error ({what} failed). Please try again.")
}

#[cfg(test)]
mod tests {
    use super::*;
    use s3s::S3ErrorCode;

    fn listed(parts: &[(i32, &str)]) -> Vec<(Option<i32>, Option<String>)> {
        parts.iter().map(|(n, e)| (Some(*n), Some((*e).to_owned()))).collect()
    }

    #[test]
    fn part_lists_must_ascend_strictly_but_may_skip() {
        assert_eq!(
            listed_parts(&listed(&[(1, "\"AB\""), (3, "cd")])).unwrap(),
            vec![(1, "ab".to_owned()), (3, "cd".to_owned())]
        );
        for bad in [&[(2, "a"), (1, "b")][..], &[(1, "a"), (1, "a")][..]] {
            assert_eq!(*listed_parts(&listed(bad)).unwrap_err().code(), S3ErrorCode::InvalidPartOrder, "{bad:?}");
        }
        assert_eq!(*listed_parts(&[]).unwrap_err().code(), S3ErrorCode::MalformedXML);
        assert_eq!(*listed_parts(&listed(&[(0, "a")])).unwrap_err().code(), S3ErrorCode::InvalidArgument);
        assert_eq!(*listed_parts(&listed(&[(10_001, "a")])).unwrap_err().code(), S3ErrorCode::InvalidArgument);
        assert_eq!(*listed_parts(&[(Some(1), None)]).unwrap_err().code(), S3ErrorCode::MalformedXML);
    }

    /// A store root with bucket `b` and the part files of upload `id` as s3s-fs writes them.
    fn root_with_parts(dir: &std::path::Path, id: &Uuid, parts: &[&[u8]]) -> Arc<Uploads> {
        fs::create_dir_all(dir.join("b")).unwrap();
        let layout = Layout::new(dir).unwrap();
        for (i, bytes) in parts.iter().enumerate() {
            write_as_s3s_fs(&layout.part(id, i as i32 + 1), bytes);
        }
        Arc::new(Uploads::new(layout))
    }

    /// A temporary file renamed into place, as s3s-fs writes a part.
    fn write_as_s3s_fs(path: &std::path::Path, bytes: &[u8]) {
        let tmp = path.with_extension("tmp");
        fs::write(&tmp, bytes).unwrap();
        fs::rename(&tmp, path).unwrap();
    }

    fn md5_hex(bytes: &[u8]) -> String {
        let mut md5 = Md5::new();
        md5.update(bytes);
        hex::encode(md5.finalize())
    }

    #[test]
    fn a_part_record_holds_for_the_file_it_was_made_from_only() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::new_v4();
        let uploads = root_with_parts(dir.path(), &id, &[b"first"]);
        let path = uploads.layout.part(&id, 1);
        uploads.record_part(id, 1, Some(&md5_hex(b"first")));
        let md5 = |uploads: &Uploads| uploads.recorded_md5(id, 1, &File::open(&path).unwrap()).map(hex::encode);
        assert_eq!(md5(&uploads), Some(md5_hex(b"first")));
        // Uploaded again (another file renamed in): the record no longer holds.
        write_as_s3s_fs(&path, b"again");
        assert_eq!(md5(&uploads), None);
        // Recorded again, then written in place (same inode, same size): not trusted either.
        uploads.record_part(id, 1, Some(&md5_hex(b"again")));
        assert_eq!(md5(&uploads), Some(md5_hex(b"again")));
        std::thread::sleep(Duration::from_millis(20));
        fs::OpenOptions::new().write(true).open(&path).unwrap().write_all(b"AGAIN").unwrap();
        assert_eq!(md5(&uploads), None);
        // No ETag (a copied part) or one that is no MD5: nothing is kept.
        uploads.record_part(id, 1, None);
        assert_eq!(md5(&uploads), None);
        uploads.record_part(id, 1, Some("not-hex"));
        assert_eq!(md5(&uploads), None);
        // Other parts and uploads have records of their own.
        assert_eq!(uploads.recorded_md5(Uuid::new_v4(), 1, &File::open(&path).unwrap()), None);
    }

    #[test]
    fn complete_takes_a_recorded_md5_and_computes_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let id = Uuid::new_v4();
        let (first, second) = (vec![1u8; MIN_PART_BYTES as usize], b"last".to_vec());
        let uploads = root_with_parts(dir.path(), &id, &[&first, &second]);
        // A record whose MD5 is not the file's: complete can only accept its
        // ETag if it takes the record instead of reading the part again.
        let recorded = "00112233445566778899aabbccddeeff";
        uploads.record_part(id, 1, Some(recorded));
        let etag = uploads.assemble(&id, "b", "k", &[(1, recorded.into()), (2, md5_hex(&second))]).unwrap();
        assert!(etag.ends_with("-2"), "{etag}");
        assert_eq!(fs::read(uploads.layout.object("b", "k")).unwrap(), [first.as_slice(), &second].concat());
        // Completing also forgot the upload's records.
        assert!(uploads.part_records.lock().unwrap().is_empty());

        // Part 2 had no record: its MD5 was computed, and a wrong ETag for it is refused.
        let id = Uuid::new_v4();
        let uploads = root_with_parts(dir.path(), &id, &[&first, &second]);
        uploads.record_part(id, 1, Some(recorded));
        let err = uploads.assemble(&id, "b", "k2", &[(1, recorded.into()), (2, recorded.into())]).unwrap_err();
        assert_eq!(*err.code(), S3ErrorCode::InvalidPart, "{err:?}");
    }
}
