//! Crash consistency: what a dev stack that died (killed, power cut) left
//! half done is finished on the next start. A build still `prepared` then
//! can never complete (its sandbox died with the stack), so it is marked
//! failed, the multipart uploads the signer made for it are aborted, and an
//! object it may have written without being registered is deleted.

use anyhow::{Context, Result};
use http::StatusCode;
use snapsign::presign::Method;

use super::shared::Shared;
use super::state::Build;

/// What one restart cleaned.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// Builds marked failed.
    pub builds: Vec<String>,
    /// Multipart uploads aborted (or found gone).
    pub uploads: Vec<String>,
}

/// Fails every build a previous run left `prepared` and cleans up after it.
pub(crate) async fn interrupted_builds(shared: &Shared) -> Result<Recovered> {
    Cleaner { shared }.run().await
}

/// The clean-up, over what the handlers share.
struct Cleaner<'a> {
    shared: &'a Shared,
}

impl Cleaner<'_> {
    async fn run(&self) -> Result<Recovered> {
        let mut recovered = Recovered::default();
        for build in self.shared.state.prepared_builds()? {
            let mut aborted = Vec::new();
            for upload in self.shared.state.open_uploads(&build.id)? {
                self.abort_upload(&upload.uri, &upload.upload_id)
                    .await
                    .with_context(|| format!("abort upload {} of interrupted build {}", upload.upload_id, build.id))?;
                self.shared.state.close_upload(&upload.upload_id, "aborted")?;
                aborted.push(upload.upload_id);
            }
            let deleted = self.delete_unregistered(&build).await?;
            let mut reason = format!(
                "interrupted: the dev stack stopped while build {} was prepared, and its builder sandbox died with it",
                build.id
            );
            if !aborted.is_empty() {
                reason.push_str(&format!("; multipart upload {} aborted at restart", aborted.join(", ")));
            }
            if deleted {
                reason.push_str(&format!("; the unregistered object {} deleted", build.snapshot_uri));
            }
            reason.push_str("; build again");
            self.shared.state.fail_build(&build.id, &reason)?;
            tracing::warn!(build = %build.id, namespace = %build.namespace, "{reason}");
            recovered.builds.push(build.id);
            recovered.uploads.extend(aborted);
        }
        Ok(recovered)
    }

    /// AbortMultipartUpload; an upload the store no longer knows is already gone.
    async fn abort_upload(&self, uri: &str, upload_id: &str) -> Result<()> {
        let key = self.key_of(uri)?;
        let object = self.shared.signer.endpoint.object(&self.shared.signer.bucket, &key);
        let url = self.shared.presigner().presign(Method::Delete, &object, &[("uploadId", upload_id)]);
        let response = self.shared.http.delete(url).send().await.context("reach the store")?;
        match response.status() {
            s if s.is_success() || s == StatusCode::NOT_FOUND => Ok(()),
            s => anyhow::bail!("the store answered {s}: {}", response.text().await.unwrap_or_default()),
        }
    }

    /// Deletes the object a failed build may have written (it was never
    /// registered, so nothing refers to it); true when there was one.
    async fn delete_unregistered(&self, build: &Build) -> Result<bool> {
        if self.shared.state.template_by_snapshot_uri(&build.snapshot_uri)?.is_some() {
            return Ok(false);
        }
        let key = self.key_of(&build.snapshot_uri)?;
        let object = self.shared.signer.endpoint.object(&self.shared.signer.bucket, &key);
        let head = self.shared.presigner().presign(Method::Get, &object, &[]);
        let exists = self.shared.http.get(head).send().await.context("reach the store")?.status().is_success();
        if !exists {
            return Ok(false);
        }
        let delete = self.shared.presigner().presign(Method::Delete, &object, &[]);
        let response = self.shared.http.delete(delete).send().await.context("reach the store")?;
        anyhow::ensure!(
            response.status().is_success(),
            "delete {} of interrupted build {}: the store answered {}",
            build.snapshot_uri,
            build.id,
            response.status()
        );
        Ok(true)
    }

    fn key_of(&self, uri: &str) -> Result<String> {
        let parsed = snapsign::signer::validate::s3_uri(uri).map_err(|why| anyhow::anyhow!("uri {uri:?} {why}"))?;
        Ok(parsed.key.to_owned())
    }
}
