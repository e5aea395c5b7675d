//! platform-api: template lookup by name, prepare and complete
//! (wit/protocol.md §2).

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use http::{HeaderMap, Method, Response, StatusCode};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};
use snapsign::presign::Method as SignMethod;
use snapsign::wire::{self, CompleteRequest, Download, PrepareRequest, Prepared, SinglePut, TemplateRef, Upload};

use super::access::{refuse_private, split_reference};
use super::http::{ApiError, Body, parse_json};
use super::images::ImageSettings;
use super::images::Images;
use super::shared::Shared;
use super::state::{Build, Template};
use snapsign::image_build::routes::{BUILDS, BY_NAME, COMPLETE, TEMPLATES};

pub use super::shape::{PrepareShape, SHAPE_HEADER};

/// The most layers a parent may have below it.
const MAX_ANCESTORS: usize = 64;

/// `body` read as a `T` of the wire model; an error names the field at
/// fault (`parentTemplate.templateId: invalid type: …`), as `missing_field`
/// when it is absent and `invalid_field` otherwise.
fn typed<T: serde::de::DeserializeOwned>(what: &str, body: &Value) -> Result<T, ApiError> {
    if !body.is_object() {
        return Err(ApiError::bad_request("invalid_body", format!("{what}: the body must be a JSON object")));
    }
    serde_path_to_error::deserialize(body).map_err(|e| {
        let code = if e.inner().to_string().starts_with("missing field") { "missing_field" } else { "invalid_field" };
        ApiError::bad_request(code, format!("{what}: {e}"))
    })
}

/// 400 `missing_field` naming the first of `fields` (wire name, value) that is empty.
fn required(fields: &[(&str, &String)]) -> Result<(), ApiError> {
    match fields.iter().find(|(_, value)| value.is_empty()) {
        Some((field, _)) => {
            Err(ApiError::bad_request("missing_field", format!("field '{field}' is required (a non-empty string)")))
        }
        None => Ok(()),
    }
}

/// Templates in one page of `GET …/sandbox-templates` unless `limit` says otherwise.
pub const TEMPLATE_PAGE: usize = 50;
/// The largest `limit` a page may ask for.
pub const MAX_TEMPLATE_PAGE: usize = 500;

/// The platform API's handler: templates, builds and their images.
pub struct PlatformApi {
    pub(crate) shared: Arc<Shared>,
    /// The prepare shape answered when a request does not pick one.
    shape: Mutex<PrepareShape>,
    /// Platform requests served on PAT-mode (org/project) paths.
    scoped_requests: AtomicU64,
    /// Registry images the Dockerfiles name, imported as templates.
    images: Images,
    /// The embedded store's root, whose records complete reads (set by the stack).
    store_root: OnceLock<PathBuf>,
}

impl PlatformApi {
    pub(crate) fn new(shared: Arc<Shared>, shape: PrepareShape) -> Self {
        PlatformApi {
            images: Images::new(shared.clone()),
            shared,
            shape: Mutex::new(shape),
            scoped_requests: AtomicU64::new(0),
            store_root: OnceLock::new(),
        }
    }

    /// Serves `method` on `uri`, whose path is `/platform/v1/[…scope/]{rest}`, for namespace `ns`.
    pub(crate) async fn handle(
        &self,
        ns: &str,
        method: &Method,
        rest: &[&str],
        headers: &HeaderMap,
        uri: &http::Uri,
        body: &[u8],
    ) -> Result<Response<Body>, ApiError> {
        let decode = |segment: &str| percent_encoding::percent_decode_str(segment).decode_utf8_lossy().into_owned();
        let answer = match (method, rest) {
            (&Method::GET, [TEMPLATES, BY_NAME, name]) => self.lookup_template(ns, &decode(name))?,
            (&Method::GET, [TEMPLATES]) => self.list_templates(ns, uri.query())?,
            (&Method::GET, [TEMPLATES, id]) => self.get_template(ns, &decode(id))?,
            (&Method::DELETE, [TEMPLATES, id]) => self.delete_template(ns, &decode(id))?,
            (&Method::POST, [BUILDS]) => {
                let shape = match headers.get(SHAPE_HEADER).and_then(|v| v.to_str().ok()) {
                    Some(value) => {
                        PrepareShape::parse(value).map_err(|e| ApiError::bad_request("invalid_header", e))?
                    }
                    None => self.shape(),
                };
                let body = parse_json(body)?;
                let imported = self.images.import_images(ns, &body).await?;
                self.prepare(ns, &body, shape, imported)?
            }
            (&Method::POST, [BUILDS, build_id, COMPLETE]) => self.complete(ns, build_id, &parse_json(body)?).await?,
            _ => {
                return Err(ApiError::not_found("no_route", format!("no platform route {method} {}", uri.path())));
            }
        };
        Ok(super::http::json(StatusCode::OK, &answer))
    }

    /// Counts a request that came on a PAT-mode path with its scope headers.
    pub(crate) fn count_scoped(&self) {
        self.scoped_requests.fetch_add(1, Ordering::SeqCst);
    }

    /// How many platform requests came on PAT-mode (org/project) paths with their scope headers.
    pub fn scoped_requests(&self) -> u64 {
        self.scoped_requests.load(Ordering::SeqCst)
    }

    /// The prepare shape answered when a request does not pick one.
    pub fn shape(&self) -> PrepareShape {
        *self.shape.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the default prepare shape.
    pub fn set_shape(&self, shape: PrepareShape) {
        *self.shape.lock().unwrap_or_else(|p| p.into_inner()) = shape;
    }

    /// Lets complete read the embedded store's own record of an object
    /// (its size and sha256, kept at CompleteMultipartUpload) instead of the object.
    pub fn set_store_root(&self, root: PathBuf) {
        let _ = self.store_root.set(root);
    }

    /// The store's record of `uri`'s object, when the store keeps one.
    fn store_record(&self, uri: &str) -> Option<(u64, String)> {
        let root = self.store_root.get()?;
        let parsed = snapsign::signer::validate::s3_uri(uri).ok()?;
        crate::store::recorded_digest(root, parsed.bucket, parsed.key)
    }

    /// Sets where registry images are pulled and laid out (once, before serving).
    pub fn set_image_settings(&self, settings: ImageSettings) {
        self.images.set_settings(settings);
    }

    /// `GET …/sandbox-templates?limit=N&cursor=C`: the caller's own templates
    /// by name, a page at a time: `{"items": [...], "nextCursor": C|null}`;
    /// `cursor` is the last name of the page before.
    pub fn list_templates(&self, caller: &str, query: Option<&str>) -> Result<Value, ApiError> {
        let (mut limit, mut cursor) = (TEMPLATE_PAGE, String::new());
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            match key.as_ref() {
                "limit" => {
                    limit = value.parse().ok().filter(|n| (1..=MAX_TEMPLATE_PAGE).contains(n)).ok_or_else(|| {
                        ApiError::bad_request(
                            "invalid_limit",
                            format!("limit '{value}' is not a number from 1 to {MAX_TEMPLATE_PAGE}"),
                        )
                    })?
                }
                "cursor" => cursor = value.into_owned(),
                _ => {}
            }
        }
        let mut page = self.shared.state.templates_of(caller, &cursor, limit + 1)?;
        let more = page.len() > limit;
        page.truncate(limit);
        let next = if more { page.last().map(|t| t.name.clone()) } else { None };
        Ok(json!({"items": page, "nextCursor": next}))
    }

    /// `GET …/sandbox-templates/{id}`: a template of the caller's, or
    /// another namespace's public one. Another's private template is not
    /// found, as if it did not exist.
    pub fn get_template(&self, caller: &str, id: &str) -> Result<Value, ApiError> {
        let template = self.visible_template(caller, id)?;
        Ok(serde_json::to_value(&template).expect("templates serialize"))
    }

    fn visible_template(&self, caller: &str, id: &str) -> Result<Template, ApiError> {
        self.shared.state.template_by_id(id)?.filter(|t| t.namespace == caller || t.public).ok_or_else(|| {
            ApiError::not_found("template_not_found", format!("no template {id} in namespace '{caller}'"))
        })
    }

    /// `DELETE …/sandbox-templates/{id}`: removes a template of the caller's
    /// and answers it. Refused with 409 `template_in_use` while a diff
    /// template (of any namespace: a public template may have children
    /// elsewhere) is built on its snapshot, since that template's sandboxes
    /// need it below their own layer; remove those first. Its snapshot
    /// object stays in the store: builds that read it are not cut off.
    pub fn delete_template(&self, caller: &str, id: &str) -> Result<Value, ApiError> {
        let template = self.visible_template(caller, id)?;
        if template.namespace != caller {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "not_owner",
                format!(
                    "template {id} ('{}/{}') belongs to namespace '{}'; namespace '{caller}' cannot remove it",
                    template.namespace, template.name, template.namespace
                ),
            ));
        }
        if let Err(dependents) = self.shared.state.remove_template(id)? {
            let own: Vec<&str> = dependents.iter().filter(|(ns, _)| ns == caller).map(|(_, n)| n.as_str()).collect();
            let others = dependents.len() - own.len();
            let mut which = Vec::new();
            if !own.is_empty() {
                which.push(format!("yours: {}", own.join(", ")));
            }
            if others > 0 {
                which.push(format!("{others} in other namespaces"));
            }
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "template_in_use",
                format!(
                    "template '{}' ({id}) is the parent of {} diff template(s) ({}); they need its snapshot below \
                     their own layer. Remove them first",
                    template.name,
                    dependents.len(),
                    which.join("; ")
                ),
            ));
        }
        tracing::info!(namespace = caller, template = %id, name = %template.name, "template removed");
        Ok(serde_json::to_value(&template).expect("templates serialize"))
    }

    /// `GET …/sandbox-templates/by-name/{reference}`: the caller's own template,
    /// or another namespace's public one (`owner/name`).
    pub fn lookup_template(&self, caller: &str, reference: &str) -> Result<Value, ApiError> {
        let (owner, name) = split_reference(caller, reference);
        let template = self.shared.state.template_by_name(owner, name)?.ok_or_else(|| {
            ApiError::not_found("template_not_found", format!("no template named '{name}' in namespace '{owner}'"))
        })?;
        refuse_private(caller, &template)?;
        Ok(serde_json::to_value(&template).expect("templates serialize"))
    }

    /// The parent a diff build names, if `caller` may build on it: by
    /// `templateId`, else by `reference` or `name` (`owner/name` for another namespace's).
    fn parent_template(&self, caller: &str, parent: &TemplateRef) -> Result<Template, ApiError> {
        self.named_template(caller, parent, "parentTemplate", "unknown_parent")
    }

    /// A template a prepare request names (`what`), if `caller` may read it.
    fn named_template(
        &self,
        caller: &str,
        parent: &TemplateRef,
        what: &str,
        code: &'static str,
    ) -> Result<Template, ApiError> {
        let by_id = parent.template_id.as_deref().filter(|s| !s.is_empty());
        let reference = parent.reference.as_deref().or(parent.name.as_deref()).unwrap_or_default();
        let template = match by_id {
            Some(id) => self.shared.state.template_by_id(id)?,
            None => {
                let (owner, name) = split_reference(caller, reference);
                self.shared.state.template_by_name(owner, name)?
            }
        };
        let template = template.ok_or_else(|| {
            ApiError::bad_request(code, format!("{what} '{}' is not a registered template", by_id.unwrap_or(reference)))
        })?;
        refuse_private(caller, &template)?;
        Ok(template)
    }

    /// `POST …/sandbox-template-builds`.
    /// `imported`: registry images the Dockerfile names ([`Images::import_images`]).
    pub fn prepare(
        &self,
        namespace: &str,
        body: &Value,
        shape: PrepareShape,
        imported: Vec<wire::LocalImage<Value>>,
    ) -> Result<Value, ApiError> {
        let request: PrepareRequest = typed("prepare request", body)?;
        required(&[
            ("name", &request.name),
            ("dockerfile", &request.dockerfile),
            ("rootfsNodeKind", &request.rootfs_node_kind),
        ])?;
        let name = request.name.as_str();
        if name.contains('/') {
            return Err(ApiError::bad_request(
                "invalid_field",
                format!(
                    "name '{name}' contains '/'; template names are plain (other namespaces refer to it as '{namespace}/{name}')"
                ),
            ));
        }
        let node_kind = request.rootfs_node_kind.as_str();
        if node_kind != "base" && node_kind != "diff" {
            return Err(ApiError::bad_request(
                "invalid_field",
                format!("rootfsNodeKind '{node_kind}' is not base or diff"),
            ));
        }
        let public = request.public;
        let parent_template = match (node_kind, &request.parent_template) {
            ("diff", Some(parent)) => Some(self.parent_template(namespace, parent)?),
            ("diff", None) => {
                return Err(ApiError::bad_request("missing_field", "a diff build needs parentTemplate {name, ...}"));
            }
            _ => None,
        };

        let n = self.shared.state.next_id("build")?;
        let build_id = format!("build-{n}");
        let snapshot_id = format!("snap-{n}");
        let rel_path = format!("sandbox-template-builds/{build_id}/{snapshot_id}.tlsnap");
        let (key, snapshot_uri) = self.shared.signer.artifact(namespace, &rel_path);

        let mut prepared = Prepared {
            build_id: build_id.clone(),
            snapshot_id: snapshot_id.clone(),
            rootfs_node_kind: node_kind.to_owned(),
            snapshot_uri: None,
            snapshot_rel_path: None,
            builder: wire::Builder {
                image: "snapsign/rootfs-builder".into(),
                command: "tl-rootfs-build".into(),
                // Two, as in the platform SDK's example answer: a build runs two
                // processes at once (tar and its gzip, zstd and the part uploads);
                // with one CPU a 300 MB context's unpack took twice as long.
                cpus: 2.0,
                memory_mb: 1024,
                disk_mb: 2048,
            },
            parent: None,
            rest: Map::from_iter([(
                "runtimeContract".to_owned(),
                json!({"guestRuntimeLayout": "embedded", "emulator": "snapsign dev"}),
            )]),
        };
        if let Some(parent) = &parent_template {
            // A diff snapshot is one layer: the builder also needs the layers below it. Their
            // reads are presigned here in every shape (snapsign's own field, which a client
            // passes through unread; one that signs reads skips those that have a download):
            // they are part of the parent's image, which the caller may read.
            let mut ancestors = Vec::new();
            let mut below = parent.parent_manifest_uri.clone();
            while let Some(uri) = below.take() {
                let Some(template) = self.shared.state.template_by_snapshot_uri(&uri)? else { break };
                if ancestors.len() >= MAX_ANCESTORS {
                    return Err(ApiError::bad_request(
                        "parent_too_deep",
                        format!("parentTemplate {} has more than {MAX_ANCESTORS} layers below it", parent.name),
                    ));
                }
                ancestors.push(wire::Ancestor::<Value> {
                    download: Some(
                        serde_json::to_value(Download::SingleGet(self.shared.presigned_get(&uri)?))
                            .expect("answers serialize"),
                    ),
                    snapshot_uri: uri,
                    snapshot_sha256: Some(template.snapshot_sha256.clone()),
                });
                below = template.parent_manifest_uri.clone();
            }
            ancestors.reverse();
            prepared.parent = Some(wire::Parent {
                ancestors,
                parent_manifest_uri: parent.snapshot_uri.clone(),
                rootfs_disk_bytes: Some(parent.rootfs_disk_bytes),
                snapshot_sha256: Some(parent.snapshot_sha256.clone()),
                // (inferred, wit/protocol.md §2.4) the legacy platform presigned parent reads itself.
                download: match shape {
                    PrepareShape::Legacy => Some(
                        serde_json::to_value(Download::SingleGet(self.shared.presigned_get(&parent.snapshot_uri)?))
                            .expect("answers serialize"),
                    ),
                    _ => None,
                },
            });
        }
        // Earlier stages' FROMs and COPY --from that name templates: each with its snapshot,
        // presigned for reading by the legacy platform, signed through get_blob by the client otherwise.
        let mut local_images = Vec::new();
        for local in &request.additional_local_images {
            let template =
                self.named_template(namespace, local, "additionalLocalImages entry", "unknown_local_image")?;
            let download = match shape {
                PrepareShape::Legacy => Some(
                    serde_json::to_value(Download::SingleGet(self.shared.presigned_get(&template.snapshot_uri)?))
                        .expect("answers serialize"),
                ),
                _ => None,
            };
            local_images.push(wire::LocalImage::<Value> {
                reference: local.reference.clone().or_else(|| local.name.clone()).unwrap_or(template.name.clone()),
                template_id: Some(template.id.clone()),
                snapshot_uri: template.snapshot_uri.clone(),
                snapshot_sha256: Some(template.snapshot_sha256.clone()),
                download,
            });
        }
        for mut image in imported {
            if shape == PrepareShape::Legacy {
                image.download = Some(
                    serde_json::to_value(Download::SingleGet(self.shared.presigned_get(&image.snapshot_uri)?))
                        .expect("answers serialize"),
                );
            }
            local_images.push(image);
        }
        prepared
            .rest
            .insert("additionalLocalImages".into(), serde_json::to_value(local_images).expect("answers serialize"));
        let legacy_upload = |uri: &str, key: &str| {
            let object = self.shared.signer.endpoint.object(&self.shared.signer.bucket, key);
            let upload = Upload::<()>::SinglePut(SinglePut {
                uri: Some(uri.to_owned()),
                method: SignMethod::Put.as_str().into(),
                url: self.shared.presigner().presign(SignMethod::Put, &object, &[]),
                headers: Default::default(),
                expires_at: Some(self.shared.expires_at()),
            });
            serde_json::to_value(upload).expect("answers serialize")
        };
        match shape {
            PrepareShape::New => prepared.snapshot_rel_path = Some(rel_path),
            PrepareShape::Legacy => {
                prepared.rest.insert("upload".into(), legacy_upload(&snapshot_uri, &key));
                prepared.snapshot_uri = Some(snapshot_uri.clone());
            }
            PrepareShape::Both => {
                let stale_key = format!("stale/{key}");
                let stale = wire::object_uri(&self.shared.signer.bucket, &stale_key);
                prepared.snapshot_rel_path = Some(rel_path);
                prepared.rest.insert("upload".into(), legacy_upload(&stale, &stale_key));
                prepared.snapshot_uri = Some(stale);
            }
        }
        self.shared.state.insert_build(&Build {
            id: build_id,
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            snapshot_id,
            snapshot_uri,
            node_kind: node_kind.to_owned(),
            parent_manifest_uri: parent_template.map(|t| t.snapshot_uri),
            public,
            state: "prepared".into(),
            failure: None,
        })?;
        Ok(serde_json::to_value(&prepared).expect("prepared builds serialize"))
    }

    /// `POST …/sandbox-template-builds/{buildId}/complete`.
    pub async fn complete(&self, namespace: &str, build_id: &str, body: &Value) -> Result<Value, ApiError> {
        let build = self.shared.state.build(build_id)?.filter(|b| b.namespace == namespace).ok_or_else(|| {
            ApiError::not_found("build_not_found", format!("no build '{build_id}' in namespace '{namespace}'"))
        })?;
        if self.shared.faults().complete_fail {
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "injected_fault",
                format!("injected fault: complete of {build_id} fails"),
            ));
        }
        if build.state == "failed" {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "build_failed",
                format!("build {build_id} failed: {}", build.failure.as_deref().unwrap_or("no reason recorded")),
            ));
        }
        if build.state != "prepared" {
            return self.repeated_complete(build_id, &build.snapshot_uri, body);
        }
        let request: CompleteRequest = typed("complete request", body)?;
        required(&[
            ("snapshotId", &request.snapshot_id),
            ("snapshotUri", &request.snapshot_uri),
            ("snapshotFormatVersion", &request.snapshot_format_version),
            ("rootfsNodeKind", &request.rootfs_node_kind),
        ])?;
        let (snapshot_id, snapshot_uri, format_version, node_kind) = (
            request.snapshot_id.as_str(),
            request.snapshot_uri.as_str(),
            request.snapshot_format_version.as_str(),
            request.rootfs_node_kind.as_str(),
        );
        let (size, disk) = (request.snapshot_size_bytes, request.rootfs_disk_bytes);
        let parent = request.parent_manifest_uri.as_deref();
        if node_kind == "diff" && parent.is_none() {
            return Err(ApiError::bad_request(
                "missing_field",
                format!("diff build {build_id} completed without parentManifestUri"),
            ));
        }
        if snapshot_uri != build.snapshot_uri {
            return Err(ApiError::bad_request(
                "wrong_snapshot_uri",
                format!(
                    "snapshotUri {snapshot_uri} is not where build {build_id}'s snapshot goes ({})",
                    build.snapshot_uri
                ),
            ));
        }
        let (actual_size, sha256) = self.object_digest(snapshot_uri).await?;
        if actual_size != size {
            return Err(ApiError::bad_request(
                "size_mismatch",
                format!("snapshotSizeBytes is {size} but the object {snapshot_uri} has {actual_size} bytes"),
            ));
        }
        let template = Template {
            id: format!("tpl-{}", self.shared.state.next_id("template")?),
            namespace: namespace.to_owned(),
            name: build.name.clone(),
            snapshot_id: snapshot_id.to_owned(),
            snapshot_uri: snapshot_uri.to_owned(),
            snapshot_format_version: format_version.to_owned(),
            snapshot_size_bytes: size,
            rootfs_disk_bytes: disk,
            rootfs_node_kind: node_kind.to_owned(),
            parent_manifest_uri: parent.map(str::to_owned),
            snapshot_sha256: sha256,
            public: build.public,
            build_id: build_id.to_owned(),
        };
        if !self.shared.state.complete(build_id, &template)? {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "already_completed",
                format!("build {build_id} was already completed"),
            ));
        }
        tracing::info!(build = build_id, template = %template.id, name = %template.name, "template registered");
        Ok(serde_json::to_value(&template).expect("templates serialize"))
    }

    /// A complete of a build that was completed already: a client retrying
    /// after a lost answer sends the same body and gets the same template
    /// (complete is idempotent); any other body is a 409 naming the field
    /// that differs.
    fn repeated_complete(&self, build_id: &str, snapshot_uri: &str, body: &Value) -> Result<Value, ApiError> {
        let conflict = |why: String| {
            ApiError::new(
                StatusCode::CONFLICT,
                "already_completed",
                format!("build {build_id} was already completed{why}"),
            )
        };
        let Some(template) =
            self.shared.state.template_by_snapshot_uri(snapshot_uri)?.filter(|t| t.build_id == build_id)
        else {
            // Its name was registered again by a later build since.
            return Err(conflict(String::new()));
        };
        let request: CompleteRequest = typed("complete request", body)?;
        let parent = request.parent_manifest_uri.as_deref().unwrap_or("(none)");
        let sent = [
            ("snapshotId", request.snapshot_id.clone()),
            ("snapshotUri", request.snapshot_uri.clone()),
            ("snapshotFormatVersion", request.snapshot_format_version.clone()),
            ("snapshotSizeBytes", request.snapshot_size_bytes.to_string()),
            ("rootfsDiskBytes", request.rootfs_disk_bytes.to_string()),
            ("rootfsNodeKind", request.rootfs_node_kind.clone()),
            ("parentManifestUri", parent.to_owned()),
        ];
        let kept = [
            template.snapshot_id.clone(),
            template.snapshot_uri.clone(),
            template.snapshot_format_version.clone(),
            template.snapshot_size_bytes.to_string(),
            template.rootfs_disk_bytes.to_string(),
            template.rootfs_node_kind.clone(),
            template.parent_manifest_uri.clone().unwrap_or_else(|| "(none)".into()),
        ];
        if let Some(((field, value), first)) = sent.iter().zip(&kept).find(|((_, value), kept)| value != *kept) {
            return Err(conflict(format!(
                " as template {} with {field} {first}; this request says {value}",
                template.id
            )));
        }
        tracing::info!(build = build_id, template = %template.id, "repeated complete answered with its template");
        Ok(serde_json::to_value(&template).expect("templates serialize"))
    }

    /// Size and sha256 of an object: the store's record of it when it keeps
    /// one (a multipart upload's, made as the store assembled the object),
    /// else read once through a presigned GET and hashed as it streams.
    pub async fn object_digest(&self, uri: &str) -> Result<(u64, String), ApiError> {
        if let Some(recorded) = self.store_record(uri) {
            return Ok(recorded);
        }
        let url = self.shared.presigned_get(uri)?.url;
        let mut response =
            self.shared.http.get(&url).send().await.map_err(|e| anyhow::anyhow!("read {uri} from the store: {e}"))?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(ApiError::bad_request(
                "object_missing",
                format!("the object {uri} does not exist in the store"),
            ));
        }
        if !response.status().is_success() {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "store_error",
                format!("store answered {} reading {uri}", response.status()),
            ));
        }
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = response.chunk().await.map_err(|e| anyhow::anyhow!("read {uri} from the store: {e}"))? {
            size += chunk.len() as u64;
            hasher.update(&chunk);
        }
        Ok((size, hex::encode(hasher.finalize())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typed_read_names_the_field_at_fault_and_its_code() {
        let error = |body: Value| typed::<PrepareRequest>("prepare request", &body).unwrap_err();
        let missing = error(json!({"name": "a", "rootfsNodeKind": "base"}));
        assert_eq!(
            (missing.code, missing.message.as_str()),
            ("missing_field", "prepare request: missing field `dockerfile`")
        );
        let nested =
            error(json!({"name": "a", "dockerfile": "d", "rootfsNodeKind": "diff", "parentTemplate": {"public": 1}}));
        assert_eq!(nested.code, "invalid_field");
        assert!(
            nested.message.starts_with("prepare request: parentTemplate.public: invalid type: integer `1`"),
            "{}",
            nested.message
        );
        assert_eq!(error(json!("text")).code, "invalid_body");
        let empty = required(&[("name", &"a".to_owned()), ("dockerfile", &String::new())]).unwrap_err();
        assert_eq!(empty.message, "field 'dockerfile' is required (a non-empty string)");
    }
}
