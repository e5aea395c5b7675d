//! Registry images in `snapsign dev`, imported by the platform as its
//! `tl sbx image import` does: a Dockerfile whose FROM (or `COPY --from`)
//! names an image that is not a template gets it as an
//! `additionalLocalImages` entry. The image is pulled over the OCI
//! distribution API ([`crate::registry`], cached by digest), laid into a
//! tree with its layers' whiteouts, written as a base snapshot under the
//! namespace's prefix (`images/sha256-….tlsnap`, so the signer signs its
//! read like any of the namespace's objects) and recorded by digest: a
//! second build from the same digest pulls nothing and writes nothing.
//! The reference builder then starts from it (wit/protocol.md §14).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use http::StatusCode;
use serde_json::Value;
use snapsign::presign::Method;
use snapsign::wire::{LocalImage, PrepareRequest};
use snapsign_rootfs_builder::archive::write_archive;
use snapsign_rootfs_builder::snapshot::{FORMAT_VERSION, SnapshotManifest};
use snapsign_rootfs_builder::tree::Tree;

use super::access::{refuse_private, split_reference};
use super::http::ApiError;
use super::shared::Shared;
use crate::registry::{self, PullOptions};

/// Where images are pulled to and laid out.
#[derive(Debug, Clone)]
pub struct ImageSettings {
    /// The pull cache (an OCI image layout) and registry options.
    pub pull: PullOptions,
    /// Scratch space for laying an image into a tree.
    pub work_dir: PathBuf,
}

/// The platform's image import: the settings and what the import reads and writes.
pub struct Images {
    shared: Arc<Shared>,
    /// Where registry images are pulled and laid out (set by the stack).
    settings: OnceLock<ImageSettings>,
}

impl Images {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Images { shared, settings: OnceLock::new() }
    }

    /// Sets where registry images are pulled and laid out (once, before serving).
    pub(crate) fn set_settings(&self, settings: ImageSettings) {
        let _ = self.settings.set(settings);
    }

    /// Where registry images go: as set, else under the system's temporary directory.
    fn settings(&self) -> ImageSettings {
        self.settings
            .get_or_init(|| {
                let dir = std::env::temp_dir().join("snapsign-dev-images");
                ImageSettings { pull: PullOptions::new(dir.join("oci")), work_dir: dir.join("work") }
            })
            .clone()
    }

    /// The registry images the prepare request's Dockerfile names and the
    /// client did not send as templates: the final FROM of a base build and
    /// the other external references (earlier FROMs, `COPY --from`) that
    /// are not templates the caller may read. Each is imported.
    pub(crate) async fn import_images(
        &self,
        namespace: &str,
        body: &Value,
    ) -> Result<Vec<LocalImage<Value>>, ApiError> {
        let Ok(request) = serde_json::from_value::<PrepareRequest>(body.clone()) else {
            return Ok(Vec::new()); // prepare names what is wrong with the body
        };
        let Ok(plan) = snapsign::image_build::plan::plan(&request.dockerfile) else {
            return Ok(Vec::new());
        };
        let mut wanted: Vec<String> = Vec::new();
        if request.parent_template.is_none() {
            let base = plan.final_lookup.clone().or_else(|| {
                // A digest reference is never looked up as a template; it can only be an image.
                Some(plan.base_image.clone()).filter(|b| b.contains('@') && !b.contains('$'))
            });
            wanted.extend(base);
        }
        wanted.extend(plan.other_lookups.iter().cloned());
        let sent: BTreeSet<String> = request
            .additional_local_images
            .iter()
            .filter_map(|t| t.reference.clone().or_else(|| t.name.clone()))
            .collect();
        let mut images = Vec::new();
        for reference in wanted {
            if sent.contains(&reference) || self.readable_template(namespace, &reference)? {
                continue;
            }
            images.push(self.import_image(namespace, &reference).await?);
        }
        Ok(images)
    }

    /// Pulls `reference` (or finds it by digest) and returns its snapshot as a local image.
    async fn import_image(&self, namespace: &str, reference: &str) -> Result<LocalImage<Value>, ApiError> {
        let settings = self.settings();
        let pulled = match registry::pull(reference, &settings.pull).await {
            Ok(pulled) => pulled,
            Err(e) => {
                let hint = self.public_elsewhere(namespace, reference)?;
                return Err(ApiError::bad_request(
                    "image_pull_failed",
                    format!(
                        "FROM {reference}: it is not a template, and pulling it as a registry image failed: {e:#}{hint}"
                    ),
                ));
            }
        };
        let local = |uri: String, sha256: String| LocalImage::<Value> {
            reference: reference.to_owned(),
            template_id: None,
            snapshot_uri: uri,
            snapshot_sha256: Some(sha256),
            download: None,
        };
        if let Some((uri, sha256, _)) = self.shared.state.image(namespace, &pulled.digest)? {
            tracing::info!(reference, digest = %pulled.digest, requests = pulled.requests, "registry image already imported");
            return Ok(local(uri, sha256));
        }
        let rel = format!("images/{}.tlsnap", pulled.digest.replace(':', "-"));
        let (key, uri) = self.shared.signer.artifact(namespace, &rel);
        let n = self.shared.state.next_id("image")?;
        let work = settings.work_dir.join(format!("import-{n}"));
        let snapshot_id = format!("image-{}", pulled.digest.trim_start_matches("sha256:").get(..12).unwrap_or("x"));
        let archive = work.join("image.tar.zst");
        let written = {
            let (work, archive) = (work.clone(), archive.clone());
            tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                let image = pulled.open()?;
                let mut tree = Tree::create(work.join("tree"))?;
                let stats = snapsign_rootfs_builder::image::apply(&image, &mut tree)?;
                let manifest = SnapshotManifest {
                    format_version: FORMAT_VERSION.into(),
                    snapshot_id,
                    node_kind: "base".into(),
                    parent_manifest_uri: None,
                    config: image.config.clone(),
                    files: 0,
                };
                let summary = write_archive(&archive, manifest, &tree, None)?;
                Ok((pulled, stats, summary))
            })
            .await
            .map_err(|e| ApiError::internal(anyhow::anyhow!("import {reference}: {e}")))?
        };
        let result = async {
            let (pulled, stats, summary) = written.map_err(|e| {
                ApiError::bad_request("image_invalid", format!("FROM {reference}: the image cannot be laid out: {e:#}"))
            })?;
            let object = self.shared.signer.endpoint.object(&self.shared.signer.bucket, &key);
            let url = self.shared.presigner().presign(Method::Put, &object, &[]);
            let file = tokio::fs::File::open(&archive).await.map_err(|e| ApiError::internal(e.into()))?;
            let response = self
                .shared
                .http
                .put(url)
                .header(http::header::CONTENT_LENGTH, summary.size_bytes)
                .body(reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file)))
                .send()
                .await
                .map_err(|e| ApiError::internal(anyhow::anyhow!("store the imported image {reference}: {e}")))?;
            if !response.status().is_success() {
                return Err(ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    "store_error",
                    format!("the store answered {} storing the imported image {reference}", response.status()),
                ));
            }
            self.shared.state.put_image(namespace, &pulled.digest, &uri, &summary.sha256, summary.size_bytes)?;
            tracing::info!(
                reference,
                digest = %pulled.digest,
                fetched_bytes = pulled.fetched_bytes,
                files = stats.files,
                snapshot_bytes = summary.size_bytes,
                %uri,
                "registry image imported"
            );
            Ok(local(uri.clone(), summary.sha256))
        }
        .await;
        let _ = tokio::fs::remove_dir_all(&work).await;
        result
    }

    /// Whether `reference` names a template the caller may build on (its
    /// own, or another namespace's public one). Another namespace's private template is refused, as at prepare.
    /// For a bare name that is no template here: the public templates of
    /// that name in other namespaces, as a hint ("write FROM other/name").
    fn public_elsewhere(&self, namespace: &str, reference: &str) -> Result<String, ApiError> {
        if reference.contains(['/', ':', '@']) {
            return Ok(String::new());
        }
        let found = self.shared.state.public_templates_named(reference, namespace)?;
        let names: Vec<String> = found.iter().map(|t| format!("FROM {}/{}", t.namespace, t.name)).collect();
        Ok(match names.as_slice() {
            [] => String::new(),
            [one] => format!(
                ". There is no template '{reference}' in namespace '{namespace}', but a public one of that name: write {one}"
            ),
            many => format!(
                ". There is no template '{reference}' in namespace '{namespace}', but public ones of that name: write {}",
                many.join(" or ")
            ),
        })
    }

    fn readable_template(&self, namespace: &str, reference: &str) -> Result<bool, ApiError> {
        let (owner, name) = split_reference(namespace, reference);
        match self.shared.state.template_by_name(owner, name)? {
            Some(template) => refuse_private(namespace, &template).map(|()| true),
            None => Ok(false),
        }
    }
}
