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

/// A signed URL of the upload expired: past its `X-Amz-Date` plus
/// `X-Amz-Expires`, or the store said so (S3: 403 AccessDenied "Request
/// has expired"). Found with `downcast_ref` through any context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UrlExpired {
    /// The part whose URL expired; 0: `completeUrl`.
    pub part: u32,
}

impl std::fmt::Display for UrlExpired {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.part {
            0 => write!(f, "the signed completeUrl expired"),
            part => write!(f, "the signed URL of part {part} expired"),
        }
    }
}

impl std::error::Error for UrlExpired {}

/// A resumable upload stopped because part URLs expired: the archive is
/// whole, these parts are up, the upload is still open (not aborted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interrupted {
    pub summary: ArchiveSummary,
    /// Parts the store took, with their ETags, in order.
    pub etags: Vec<(u32, String)>,
    /// The first part whose URL expired.
    pub expired: UrlExpired,
}

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}; {} parts are up and the upload stays open for fresh URLs", self.expired, self.etags.len())
    }
}

impl std::error::Error for Interrupted {}

/// Whether an UploadPart answer means its URL expired.
pub fn is_expired(status: u16, body: &str) -> bool {
    status == 403 && body.contains("Request has expired")
}

/// Whether a SigV4 presigned `url` is past its lifetime at `now` (seconds
/// since the epoch): `X-Amz-Date` plus `X-Amz-Expires`. A store refuses
/// such a URL as soon as it reads the request line, often before the body
/// is read, so the client sees a broken pipe rather than the 403: the
/// uploader checks first. `None` when the URL does not say.
pub fn url_expired(url: &str, now: u64) -> Option<bool> {
    let query = url.split_once('?')?.1;
    let param = |name: &str| query.split('&').find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='));
    let expires: u64 = param("X-Amz-Expires")?.parse().ok()?;
    let date = param("X-Amz-Date")?.as_bytes();
    if date.len() != 16 || date[8] != b'T' || date[15] != b'Z' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<i64> { std::str::from_utf8(&date[range]).ok()?.parse().ok() };
    let (y, m, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (hh, mm, ss) = (num(9..11)?, num(11..13)?, num(13..15)?);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let signed = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(now as i64 > signed + expires as i64)
}

fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

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
///
/// `options.resumable`: when part URLs expire, a multipart upload is not
/// aborted; the archive is still written whole, and the error is an
/// [`Interrupted`] saying which parts are up, for a resume with fresh URLs.
pub fn write_and_upload(
    agent: &Agent,
    upload: &Upload,
    archive: &Path,
    options: PartOptions,
    write: impl FnOnce(&dyn Fn(u64) -> io::Result<()>) -> Result<ArchiveSummary>,
) -> Result<ArchiveSummary> {
    match upload {
        Upload::SinglePut(put) => {
            let summary = write(&|_| Ok(()))?;
            single_put(agent, put, archive, summary.size_bytes)?;
            Ok(summary)
        }
        Upload::S3Multipart(multipart) => s3_multipart_overlapped(agent, multipart, archive, options, write),
    }
}

/// How parts go up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PartOptions {
    /// Expired part URLs end the upload as [`Interrupted`], not aborted.
    pub resumable: bool,
    /// Wait this long before each part after the first (the
    /// `delay_parts_ms` fault: lets short-lived URLs expire in tests).
    pub delay: std::time::Duration,
}

/// UploadPart for each part as soon as its bytes are written (up to
/// [`PARALLEL_PARTS`] at once), then CompleteMultipartUpload. Any failure,
/// of the writing or of a part, even before the first part, aborts the
/// multipart upload so no parts are left behind.
pub fn s3_multipart_overlapped(
    agent: &Agent,
    multipart: &S3Multipart,
    archive: &Path,
    options: PartOptions,
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
    let result =
        overlapped_parts(agent, multipart, archive, options, write).and_then(|(summary, etags)| {
            match complete(agent, multipart, &etags, options.resumable) {
                Ok(()) => Ok(summary),
                Err(err) => match err.downcast_ref::<UrlExpired>() {
                    Some(expired) if options.resumable => Err(Interrupted { summary, etags, expired: *expired }.into()),
                    _ => Err(err),
                },
            }
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
        // Kept open: the caller asks for fresh URLs and resumes.
        Err(err) if err.downcast_ref::<Interrupted>().is_some() => Err(err),
        Err(err) => {
            abort(agent, multipart);
            Err(err.context(format!("multipart upload {} failed", multipart.upload_id)))
        }
    }
}

/// Resumes an [`Interrupted`] upload through `multipart`, the same upload
/// with fresh URLs: the parts not yet up go ([`PARALLEL_PARTS`] at once),
/// then CompleteMultipartUpload. A URL expired again: [`Interrupted`] with
/// the parts up by then (the upload stays open). Any other failure aborts it.
pub fn resume(
    agent: &Agent,
    multipart: &S3Multipart,
    archive: &Path,
    interrupted: Interrupted,
) -> Result<ArchiveSummary> {
    let Interrupted { summary, etags, .. } = interrupted;
    let (size, part_size) = (summary.size_bytes, multipart.part_size_bytes);
    let started = Instant::now();
    let total = size.div_ceil(part_size.max(1)).max(1);
    println!(
        "Resuming multipart upload {} with fresh URLs: {} of {total} parts are up",
        multipart.upload_id,
        etags.len()
    );
    let etags = Mutex::new(etags);
    let send_rest = || -> Result<()> {
        check_fits(size, part_size, multipart.max_parts, &multipart.part_urls)?;
        let missing: Vec<PartRange> = (1..)
            .map_while(|number| part_len(number, part_size, size).map(|len| (number, len)))
            .filter(|(number, _)| !etags.lock().expect("no panics while held").iter().any(|(n, _)| n == number))
            .map(|(number, len)| {
                let url = part_url(&multipart.part_urls, number)?.to_owned();
                Ok(PartRange { number, offset: u64::from(number - 1) * part_size, len, url })
            })
            .collect::<Result<_, crate::multipart::MultipartError>>()?;
        let next = AtomicU32::new(0);
        let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
        thread::scope(|scope| {
            for _ in 0..PARALLEL_PARTS.min(missing.len()) {
                scope.spawn(|| {
                    loop {
                        if failure.lock().expect("no panics while held").is_some() {
                            break;
                        }
                        let Some(part) = missing.get(next.fetch_add(1, Ordering::SeqCst) as usize) else { break };
                        match upload_part(agent, multipart, archive, part, true) {
                            Ok(etag) => etags.lock().expect("no panics while held").push((part.number, etag)),
                            Err(err) => {
                                failure.lock().expect("no panics while held").get_or_insert(err);
                                break;
                            }
                        }
                    }
                });
            }
        });
        if let Some(err) = failure.into_inner().expect("no panics while held") {
            return Err(err);
        }
        let mut done = etags.lock().expect("no panics while held").clone();
        done.sort();
        complete(agent, multipart, &done, true)
    };
    match send_rest() {
        Ok(()) => {
            println!(
                "Multipart upload {} complete after the resume: {} in {:.1}s",
                multipart.upload_id,
                human_bytes(size),
                started.elapsed().as_secs_f64()
            );
            Ok(summary)
        }
        Err(err) => match err.downcast_ref::<UrlExpired>() {
            Some(expired) => {
                let mut etags = etags.into_inner().expect("no panics while held");
                etags.sort();
                Err(Interrupted { summary, etags, expired: *expired }.into())
            }
            None => {
                abort(agent, multipart);
                Err(err.context(format!("multipart upload {} failed while resuming", multipart.upload_id)))
            }
        },
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
    /// A part URL expired (resumable): no new part starts, the writer goes on.
    expired: Option<UrlExpired>,
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
            if state.stopped || state.expired.is_some() {
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
    options: PartOptions,
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
                    if number > 1 && !options.delay.is_zero() {
                        thread::sleep(options.delay);
                    }
                    match upload_part(agent, multipart, archive, &part, options.resumable) {
                        Ok(etag) => etags.lock().expect("no panics while held").push((number, etag)),
                        Err(err) => match err.downcast_ref::<UrlExpired>() {
                            Some(expired) if options.resumable => {
                                let expired = *expired;
                                println!("{expired}: no new part starts; the archive is finished for a resume");
                                feed.update(|state| {
                                    state.expired.get_or_insert(expired);
                                });
                                break;
                            }
                            _ => {
                                fail(err);
                                break;
                            }
                        },
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
    let expired = feed.state.into_inner().expect("no panics while held").expired;
    if let Some(expired) = expired {
        return Err(Interrupted { summary, etags, expired }.into());
    }
    Ok((summary, etags))
}

/// One UploadPart: the part's bytes streamed from the file, its ETag
/// returned as sent. `precheck`: a URL past its lifetime by this machine's
/// clock is [`UrlExpired`] without being sent (only where the caller can get
/// fresh URLs: a clock ahead of the signer's would refuse good URLs).
pub fn upload_part(
    agent: &Agent,
    multipart: &S3Multipart,
    archive: &Path,
    part: &PartRange,
    precheck: bool,
) -> Result<String> {
    let n = part.number;
    if precheck && url_expired(&part.url, now_secs()) == Some(true) {
        return Err(anyhow::Error::new(UrlExpired { part: n }).context(format!("UploadPart part {n}")));
    }
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
        .map_err(|e| match url_expired(&part.url, now_secs()) {
            // Refused for its age while the body was on its way.
            Some(true) => {
                anyhow::Error::new(UrlExpired { part: n }).context(format!("UploadPart part {n} (PUT {url}): {e}"))
            }
            _ => anyhow!("UploadPart part {n} (PUT {url}) failed: {e}"),
        })?;
    let status = response.status().as_u16();
    let body = body_text(&mut response);
    if is_expired(status, &body) {
        return Err(anyhow::Error::new(UrlExpired { part: n }).context(format!("UploadPart part {n} (PUT {url})")));
    }
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

/// CompleteMultipartUpload with `etags`. Its URL expired (checked first
/// with `precheck`, as [`upload_part`]; or the store said so): [`UrlExpired`] for part 0.
pub fn complete(agent: &Agent, multipart: &S3Multipart, etags: &[(u32, String)], precheck: bool) -> Result<()> {
    let url = redact_url(&multipart.complete_url);
    if precheck && url_expired(&multipart.complete_url, now_secs()) == Some(true) {
        return Err(anyhow::Error::new(UrlExpired { part: 0 }).context("CompleteMultipartUpload"));
    }
    println!("Completing multipart upload {} ({} parts) at {url}", multipart.upload_id, etags.len());
    let mut response = agent
        .post(&multipart.complete_url)
        .header("content-type", "application/xml")
        .send(complete_body(etags).as_bytes())
        .map_err(|e| anyhow!("CompleteMultipartUpload (POST {url}) failed: {e}"))?;
    let status = response.status().as_u16();
    let body = body_text(&mut response);
    if is_expired(status, &body) {
        return Err(anyhow::Error::new(UrlExpired { part: 0 }).context(format!("CompleteMultipartUpload (POST {url})")));
    }
    check_complete(status, &body).map_err(|e| anyhow!("{e} (POST {url})"))
}

/// AbortMultipartUpload through `abortUrl`; the outcome is only logged.
pub fn abort(agent: &Agent, multipart: &S3Multipart) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_presigned_url_is_expired_once_its_date_plus_its_lifetime_is_past() {
        // 2026-01-01T00:00:00Z is 1767225600.
        let url = "http://s/b/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Date=20260101T000000Z&X-Amz-Expires=600\
                   &X-Amz-SignedHeaders=host&partNumber=2&X-Amz-Signature=00";
        assert_eq!(url_expired(url, 1_767_225_600 + 600), Some(false));
        assert_eq!(url_expired(url, 1_767_225_600 + 601), Some(true));
        let leap = "http://s/k?X-Amz-Date=20240229T235959Z&X-Amz-Expires=1";
        assert_eq!(url_expired(leap, 1_709_251_199 + 1), Some(false));
        assert_eq!(url_expired(leap, 1_709_251_199 + 2), Some(true));
        for unknown in ["http://s/k", "http://s/k?X-Amz-Expires=5", "http://s/k?X-Amz-Date=2026&X-Amz-Expires=5"] {
            assert_eq!(url_expired(unknown, 0), None, "{unknown}");
        }
        assert!(is_expired(403, "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>"));
        assert!(!is_expired(403, "<Error><Code>AccessDenied</Code></Error>"));
    }
}
