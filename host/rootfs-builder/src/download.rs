//! Fetching the parent archive of a diff build through `parent.download`.

use std::fs::File;
use std::io::{self, BufWriter};
use std::path::Path;
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail};
use ureq::Agent;

use crate::archive::HashingWriter;
use crate::http::{body_text, redact_url};
use crate::human_bytes;
use crate::multipart::excerpt;
use snapsign::wire::{Download, SingleGet};

/// GETs the parent archive into `dest`, streaming; returns (size, hex sha256).
pub fn download_parent(agent: &Agent, download: &Download, dest: &Path) -> Result<(u64, String)> {
    let Download::SingleGet(SingleGet { method, url, headers, .. }) = download;
    if !method.eq_ignore_ascii_case("GET") {
        bail!("spec.parent.download.method is {method}; only GET is supported");
    }
    println!("Downloading the parent snapshot from {}", redact_url(url));
    let started = Instant::now();
    let mut request = agent.get(url);
    for (name, value) in headers {
        request = request.header(name, value);
    }
    let mut response = request.call().map_err(|e| anyhow!("GET {} (parent.download) failed: {e}", redact_url(url)))?;
    let status = response.status().as_u16();
    if !response.status().is_success() {
        let body = body_text(&mut response);
        bail!("GET {} (parent.download) answered HTTP {status}: {}", redact_url(url), excerpt(&body));
    }
    let file = File::create(dest).with_context(|| format!("create {}", dest.display()))?;
    let mut writer = HashingWriter::new(BufWriter::with_capacity(1 << 20, file));
    io::copy(&mut response.body_mut().as_reader(), &mut writer)
        .with_context(|| format!("read the parent archive from {}", redact_url(url)))?;
    let (file, digest, size) = writer.finish();
    file.into_inner().map_err(|e| e.into_error()).context("write the parent archive")?;
    let sha256 = hex::encode(digest);
    println!(
        "Downloaded the parent snapshot: {} in {:.1}s, sha256 {sha256}",
        human_bytes(size),
        started.elapsed().as_secs_f64()
    );
    Ok((size, sha256))
}

/// The downloaded archive must be the one the platform registered.
pub fn check_sha256(expected: Option<&str>, actual: &str, size: u64) -> Result<(), String> {
    match expected {
        Some(expected) if !expected.trim().eq_ignore_ascii_case(actual) => Err(format!(
            "the parent archive does not match: spec.parent.snapshotSha256 is {} but the downloaded archive \
             ({size} bytes) has sha256 {actual}",
            expected.trim()
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_mismatch_names_both_hashes() {
        let actual = "a".repeat(64);
        assert_eq!(check_sha256(Some(&actual.to_uppercase()), &actual, 3), Ok(()));
        assert_eq!(check_sha256(None, &actual, 3), Ok(()));
        let err = check_sha256(Some(&"b".repeat(64)), &actual, 3).unwrap_err();
        assert!(err.contains(&"b".repeat(64)) && err.contains(&actual), "{err}");
    }
}
