//! S3's `AbortIncompleteMultipartUpload` lifecycle rule for the whole store:
//! uploads initiated longer ago than the configured age are aborted (parts,
//! attributes and record removed) and logged. A task checks at start and
//! then every quarter of the age (at most every 10 minutes) until the store
//! stops.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;

use super::multipart::Uploads;

/// The age after which an incomplete upload is aborted, unless configured.
pub const DEFAULT_ABORT_INCOMPLETE_AFTER: Duration = Duration::from_secs(24 * 3600);

/// How often the reaper looks for uploads older than `age`.
pub fn interval(age: Duration) -> Duration {
    (age / 4).clamp(Duration::from_millis(50), Duration::from_secs(600))
}

/// Runs until `stopped` resolves (its sender is dropped with the store).
pub async fn run(uploads: Arc<Uploads>, age: Duration, mut stopped: oneshot::Receiver<()>) {
    let every = interval(age);
    loop {
        match uploads.reap(age, SystemTime::now()).await {
            Ok(reaped) => {
                for upload in reaped {
                    let (bucket, key) = upload.object.unwrap_or_default();
                    tracing::info!(
                        upload_id = %upload.upload_id,
                        bucket,
                        key,
                        age_secs = upload.age.as_secs(),
                        parts = upload.parts,
                        "store: AbortIncompleteMultipartUpload: aborted an upload initiated over {:?} ago",
                        age
                    );
                }
            }
            Err(e) => tracing::warn!("store: AbortIncompleteMultipartUpload pass failed: {e}"),
        }
        tokio::select! {
            _ = &mut stopped => break,
            _ = tokio::time::sleep(every) => {}
        }
    }
    tracing::debug!("store: upload reaper stopped");
}
