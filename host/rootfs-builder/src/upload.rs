//! Uploading the archive through `spec.upload`: one PUT (`single_put`), or an
//! S3 multipart upload (`s3_multipart`: UploadPart in parallel, then
//! CompleteMultipartUpload; AbortMultipartUpload on any failure). No retries:
//! a failed request fails the build, with its part number, status and body.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail};
use ureq::{Agent, SendBody};

use crate::http::{body_text, redact_url, scrub_urls};
use crate::human_bytes;
use crate::multipart::{PartRange, check_complete, complete_body, excerpt, plan_parts};
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

pub fn upload(agent: &Agent, upload: &Upload, archive: &Path, size: u64) -> Result<()> {
    match upload {
        Upload::SinglePut(put) => single_put(agent, put, archive, size),
        Upload::S3Multipart(multipart) => s3_multipart(agent, multipart, archive, size),
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

/// UploadPart for each part (up to [`PARALLEL_PARTS`] at once), then
/// CompleteMultipartUpload. Any failure, even before the first part, aborts
/// the multipart upload so no parts are left behind.
pub fn s3_multipart(agent: &Agent, multipart: &S3Multipart, archive: &Path, size: u64) -> Result<()> {
    println!(
        "Multipart upload {}: {} ({size} bytes) in parts of {} bytes, {} part URLs signed",
        multipart.upload_id,
        human_bytes(size),
        multipart.part_size_bytes,
        multipart.part_urls.len()
    );
    let started = Instant::now();
    let result = plan_parts(size, multipart.part_size_bytes, multipart.max_parts, &multipart.part_urls)
        .map_err(anyhow::Error::from)
        .and_then(|parts| {
            let etags = upload_parts(agent, multipart, archive, &parts)?;
            complete(agent, multipart, &etags)
        });
    match result {
        Ok(()) => {
            println!(
                "Multipart upload {} complete: {} in {:.1}s",
                multipart.upload_id,
                human_bytes(size),
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Err(err) => {
            abort(agent, multipart);
            Err(err.context(format!("multipart upload {} failed", multipart.upload_id)))
        }
    }
}

fn upload_parts(
    agent: &Agent,
    multipart: &S3Multipart,
    archive: &Path,
    parts: &[PartRange],
) -> Result<Vec<(u32, String)>> {
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let etags = Mutex::new(Vec::with_capacity(parts.len()));
    let failure: Mutex<Option<anyhow::Error>> = Mutex::new(None);
    thread::scope(|scope| {
        for _ in 0..parts.len().min(PARALLEL_PARTS) {
            scope.spawn(|| {
                while !stop.load(Ordering::SeqCst) {
                    let Some(part) = parts.get(next.fetch_add(1, Ordering::SeqCst)) else { break };
                    match upload_part(agent, multipart, archive, part, parts.len()) {
                        Ok(etag) => etags.lock().expect("no panics while held").push((part.number, etag)),
                        Err(err) => {
                            stop.store(true, Ordering::SeqCst);
                            failure.lock().expect("no panics while held").get_or_insert(err);
                        }
                    }
                }
            });
        }
    });
    if let Some(err) = failure.into_inner().expect("no panics while held") {
        return Err(err);
    }
    let mut etags = etags.into_inner().expect("no panics while held");
    etags.sort();
    Ok(etags)
}

/// One UploadPart: the part's bytes streamed from the file, its ETag returned as sent.
fn upload_part(
    agent: &Agent,
    multipart: &S3Multipart,
    archive: &Path,
    part: &PartRange,
    count: usize,
) -> Result<String> {
    let n = part.number;
    let url = redact_url(&part.url);
    let mut file = File::open(archive).with_context(|| format!("open {}", archive.display()))?;
    file.seek(SeekFrom::Start(part.offset)).with_context(|| format!("seek to part {n}"))?;
    println!(
        "Uploading part {n}/{count}: {} (bytes {}..{})",
        human_bytes(part.len),
        part.offset,
        part.offset + part.len
    );
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
    println!("Uploaded part {n}/{count} in {:.1}s, ETag {etag}", started.elapsed().as_secs_f64());
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
