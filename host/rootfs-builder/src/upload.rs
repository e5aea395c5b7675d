//! Uploading the archive through `spec.upload`: one PUT (`single_put`), or an
//! S3 multipart upload (`s3_multipart`: UploadPart in parallel, each part as
//! soon as the archive writer has put its bytes in the file, then
//! CompleteMultipartUpload; AbortMultipartUpload on any failure). No retries:
//! a failed request fails the build, with its part number, status and body.

use std::fs::File;
use std::io;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Condvar, Mutex};
use std::thread;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail};
use ureq::{Agent, SendBody};

use crate::archive::ArchiveSummary;
use crate::http::{body_text, redact_url, scrub_urls};
use crate::human_bytes;
use crate::multipart::{PartRange, check_complete, check_fits, complete_body, excerpt, part_len, part_url};
use snapsign::wire::{S3Multipart, SinglePut, Upload};

/// At most this many UploadPart requests at once.
pub const PARALLEL_PARTS: usize = 4;

/// Every URL of an upload block, named by its spec field.
pub fn urls(upload: &Upload) -> Vec<(String, &str)> {
    match upload {
        Upload::SinglePut(put) => vec![("spec.upload.url".into(), put.url.as_str())],
        Upload::S3Multipart(multipart) => {
            let mut urls: Vec<(String, &str)> = multipart
                .part_urls
                .iter()
                .map(|p| (format!("spec.upload.partUrls[partNumber {}].url", p.part_number), p.url.as_str()))
                .collect();
            urls.push(("spec.upload.completeUrl".into(), multipart.complete_url.as_str()));
            if let Some(abort) = &multipart.abort_url {
                urls.push(("spec.upload.abortUrl".into(), abort.as_str()));
            }
            urls
        }
    }
}

/// The whole archive in one request, with the headers the signer asked for.
pub fn single_put(agent: &Agent, put: &SinglePut, archive: &Path, size: u64) -> Result<()> {
    let url = redact_url(&put.url);
    println!("Uploading {} ({size} bytes) with one {} to {url}", human_bytes(size), put.method);
    let started = Instant::now();
    let file = File::open(archive).with_context(|| format!("open {}", archive.display()))?;
    let mut request = match put.method.to_ascii_uppercase().as_str() {
        "PUT" => agent.put(&put.url),
        "POST" => agent.post(&put.url),
        other => bail!("spec.upload.method is {other}; single_put supports PUT (or POST)"),
    };
    for (name, value) in &put.headers {
        request = request.header(name, value);
    }
    let mut response = request
        .header("content-length", size.to_string())
        .send(SendBody::from_owned_reader(file.take(size)))
        .map_err(|e| anyhow!("{} {url} (single_put upload) failed: {e}", put.method))?;
    let status = response.status().as_u16();
    let body = body_text(&mut response);
    if !response.status().is_success() {
        bail!("{} {url} (single_put upload) answered HTTP {status}: {}", put.method, excerpt(&body));
    }
    println!("Uploaded {} in {:.1}s (HTTP {status})", human_bytes(size), started.elapsed().as_secs_f64());
    Ok(())
}

/// Writes the archive with `write` and uploads it. A multipart upload's
/// parts go up as soon as their bytes are in the file, while the rest is
/// still being compressed ([`s3_multipart_overlapped`]); a single PUT goes
/// once the archive is whole. `write` gets the observer to hand to
/// [`crate::archive::write_archive_observed`].
pub fn write_and_upload(
    agent: &Agent,
    upload: &Upload,
    archive: &Path,
    write: impl FnOnce(&dyn Fn(u64) -> io::Result<()>) -> Result<ArchiveSummary>,
) -> Result<ArchiveSummary> {
    match upload {
        Upload::SinglePut(put) => {
            let summary = write(&|_| Ok(()))?;
            single_put(agent, put, archive, summary.size_bytes)?;
            Ok(summary)
        }
        Upload::S3Multipart(multipart) => s3_multipart_overlapped(agent, multipart, archive, write),
    }
}

/// UploadPart for each part as soon as its bytes are written (up to
/// [`PARALLEL_PARTS`] at once), then CompleteMultipartUpload. Any failure,
/// of the writing or of a part, even before the first part, aborts the
/// multipart upload so no parts are left behind.
pub fn s3_multipart_overlapped(
    agent: &Agent,
    multipart: &S3Multipart,
    archive: &Path,
    write: impl FnOnce(&dyn Fn(u64) -> io::Result<()>) -> Result<ArchiveSummary>,
) -> Result<ArchiveSummary> {
    // The URLs are signed before the snapshot exists, for the largest it may be (the rootfs size);
    // those it does not need expire unused.
    println!(
        "Multipart upload {}: parts of {} go up as they are written; {} part URLs were signed, \
         enough for {} (the rootfs size), and only those the snapshot fills are used",
        multipart.upload_id,
        human_bytes(multipart.part_size_bytes),
        multipart.part_urls.len(),
        human_bytes(multipart.part_size_bytes.saturating_mul(multipart.part_urls.len() as u64))
    );
    let started = Instant::now();
    let result = overlapped_parts(agent, multipart, archive, write).and_then(|(summary, etags)| {
        complete(agent, multipart, &etags)?;
        Ok(summary)
    });
    match result {
        Ok(summary) => {
            println!(
                "Multipart upload {} complete: {} in {:.1}s (writing included)",
                multipart.upload_id,
                human_bytes(summary.size_bytes),
                started.elapsed().as_secs_f64()
            );
            Ok(summary)
        }
        Err(err) => {
            abort(agent, multipart);
            Err(err.context(format!("multipart upload {} failed", multipart.upload_id)))
        }
    }
}

/// How much of the archive is in the file, shared by its writer and the part uploaders.
#[derive(Default)]
struct Feed {
    state: Mutex<FeedState>,
    changed: Condvar,
}

#[derive(Default)]
struct FeedState {
    written: u64,
    /// The archive's size, once it is whole.
    total: Option<u64>,
    /// Something failed: everyone stops.
    stopped: bool,
}

/// Stops the uploaders when dropped before the archive is whole (the writer panicked).
struct StopOnDrop<'a>(&'a Feed);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.update(|state| {
            if state.total.is_none() {
                state.stopped = true;
            }
        });
    }
}

/// What a part uploader may do with part bytes `offset..offset+len`.
enum Ready {
    /// Upload that many bytes.
    Part(u64),
    /// The archive ended before this part.
    Past,
    Stopped,
}

impl Feed {
    fn update(&self, change: impl FnOnce(&mut FeedState)) {
        change(&mut self.state.lock().expect("no panics while held"));
        self.changed.notify_all();
    }

    fn stopped(&self) -> bool {
        self.state.lock().expect("no panics while held").stopped
    }

    /// Waits until part `number` (at `offset`, at most `part_size` bytes) is wholly in the file.
    fn wait_for(&self, number: u32, offset: u64, part_size: u64) -> Ready {
        let mut state = self.state.lock().expect("no panics while held");
        loop {
            if state.stopped {
                return Ready::Stopped;
            }
            if let Some(total) = state.total {
                return part_len(number, part_size, total).map_or(Ready::Past, Ready::Part);
            }
            if state.written >= offset + part_size {
                return Ready::Part(part_size);
            }
            state = self.changed.wait(state).expect("no panics while held");
        }
    }
}

/// Runs the writer on this thread and the part uploaders beside it; returns
/// the archive's summary and the parts' ETags in order.
fn overlapped_parts(
    agent: &Agent,
    multipart: &S3Multipart,
    archive: &Path,
    write: impl FnOnce(&dyn Fn(u64) -> io::Result<()>) -> Result<ArchiveSummary>,
) -> Result<(ArchiveSummary, Vec<(u32, String)>)> {
    let part_size = multipart.part_size_bytes;
    let fits = |size| check_fits(size, part_size, multipart.max_parts, &multipart.part_urls);
    fits(0)?;
    let feed = Feed::default();
    let next = AtomicU32::new(1);
    let etags = Mutex::new(Vec::new());
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    let fail = |err: anyhow::Error| {
        failure.lock().expect("no panics while held").get_or_insert(err);
        feed.update(|state| state.stopped = true);
    };
    let written = thread::scope(|scope| {
        for _ in 0..PARALLEL_PARTS {
            scope.spawn(|| {
                loop {
                    let number = next.fetch_add(1, Ordering::SeqCst);
                    let offset = u64::from(number - 1) * part_size;
                    let len = match feed.wait_for(number, offset, part_size) {
                        Ready::Part(len) => len,
                        Ready::Past | Ready::Stopped => break,
                    };
                    let url = match part_url(&multipart.part_urls, number) {
                        Ok(url) => url.to_owned(),
                        Err(err) => {
                            fail(err.into());
                            break;
                        }
                    };
                    let part = PartRange { number, offset, len, url };
                    match upload_part(agent, multipart, archive, &part) {
                        Ok(etag) => etags.lock().expect("no panics while held").push((number, etag)),
                        Err(err) => {
                            fail(err);
                            break;
                        }
                    }
                }
            });
        }
        let observe = |written: u64| {
            // Past what the signed URLs carry: stop writing now, not at the end.
            fits(written).map_err(|err| io::Error::other(err.to_string()))?;
            feed.update(|state| state.written = written);
            if feed.stopped() { Err(io::Error::other("a part upload failed")) } else { Ok(()) }
        };
        // A writer that panics must not leave the uploaders waiting (the scope would never end).
        let _stop_if_unwinding = StopOnDrop(&feed);
        let written = write(&observe);
        match &written {
            Ok(summary) => feed.update(|state| state.total = Some(summary.size_bytes)),
            Err(_) => feed.update(|state| state.stopped = true),
        }
        written
    });
    // A part's failure is the cause; the writing then only stopped.
    if let Some(err) = failure.into_inner().expect("no panics while held") {
        return Err(err);
    }
    let summary = written?;
    let mut etags = etags.into_inner().expect("no panics while held");
    etags.sort();
    Ok((summary, etags))
}

/// One UploadPart: the part's bytes streamed from the file, its ETag returned as sent.
fn upload_part(agent: &Agent, multipart: &S3Multipart, archive: &Path, part: &PartRange) -> Result<String> {
    let n = part.number;
    let url = redact_url(&part.url);
    let mut file = File::open(archive).with_context(|| format!("open {}", archive.display()))?;
    file.seek(SeekFrom::Start(part.offset)).with_context(|| format!("seek to part {n}"))?;
    println!("Uploading part {n}: {} (bytes {}..{})", human_bytes(part.len), part.offset, part.offset + part.len);
    let started = Instant::now();
    let mut request = agent.put(&part.url);
    for (name, value) in &multipart.headers {
        request = request.header(name, value);
    }
    let mut response = request
        .header("content-length", part.len.to_string())
        .send(SendBody::from_owned_reader(file.take(part.len)))
        .map_err(|e| anyhow!("UploadPart part {n} (PUT {url}) failed: {e}"))?;
    let status = response.status().as_u16();
    let body = body_text(&mut response);
    if !response.status().is_success() {
        bail!("UploadPart part {n} (PUT {url}) answered HTTP {status}: {}", excerpt(&body));
    }
    let etag = response
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("UploadPart part {n} (PUT {url}) answered HTTP {status} without an ETag header"))?;
    println!("Uploaded part {n} in {:.1}s, ETag {etag}", started.elapsed().as_secs_f64());
    Ok(etag)
}

fn complete(agent: &Agent, multipart: &S3Multipart, etags: &[(u32, String)]) -> Result<()> {
    let url = redact_url(&multipart.complete_url);
    println!("Completing multipart upload {} ({} parts) at {url}", multipart.upload_id, etags.len());
    let mut response = agent
        .post(&multipart.complete_url)
        .header("content-type", "application/xml")
        .send(complete_body(etags).as_bytes())
        .map_err(|e| anyhow!("CompleteMultipartUpload (POST {url}) failed: {e}"))?;
    let status = response.status().as_u16();
    let body = body_text(&mut response);
    check_complete(status, &body).map_err(|e| anyhow!("{e} (POST {url})"))
}

/// AbortMultipartUpload through `abortUrl`; the outcome is only logged.
fn abort(agent: &Agent, multipart: &S3Multipart) {
    let id = &multipart.upload_id;
    let Some(abort_url) = &multipart.abort_url else {
        eprintln!("warning: spec.upload has no abortUrl; multipart upload {id} is left for the store to expire");
        return;
    };
    let url = redact_url(abort_url);
    match agent.delete(abort_url).call() {
        Ok(response) if response.status().is_success() => {
            eprintln!("Aborted multipart upload {id} (DELETE {url} answered HTTP {})", response.status().as_u16());
        }
        Ok(mut response) => {
            let status = response.status().as_u16();
            let body = body_text(&mut response);
            eprintln!(
                "warning: aborting multipart upload {id} failed: DELETE {url} answered HTTP {status}: {}",
                excerpt(&body)
            );
        }
        Err(e) => {
            eprintln!("warning: aborting multipart upload {id} failed: DELETE {url}: {}", scrub_urls(&e.to_string()))
        }
    }
}
