//! Starting the store: s3s (SigV4 checked, presigned URLs included) over
//! our rules over s3s-fs (objects as files), served on loopback.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result, anyhow, bail};
use bytes::Bytes;
use http_body_util::{Either, Full};
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;
use tokio::sync::oneshot;

use super::config::StoreConfig;
use super::layout::Layout;
use super::multipart::Uploads;
use super::s3::Store;
use super::{presigned, reaper};
use snapsign_runtime::serve::{self, Server};

/// Creates `bucket` under `root` unless it exists.
pub fn ensure_bucket(root: &Path, bucket: &str) -> Result<()> {
    if !snapsign::signer::config::valid_bucket(bucket) {
        return Err(anyhow!("'{bucket}' is not a valid S3 bucket name"));
    }
    let dir = root.join(bucket);
    std::fs::create_dir_all(&dir).with_context(|| format!("create bucket directory {}", dir.display()))
}

fn xml_error(status: u16, body: String) -> http::Response<Either<s3s::Body, Full<Bytes>>> {
    let response = http::Response::builder().status(status).header("content-type", "application/xml");
    response.body(Either::Right(Full::new(Bytes::from(body)))).expect("valid response")
}

/// Starts the store; it serves until the returned [`Server`] stops, and its
/// upload reaper with it.
pub async fn start(config: &StoreConfig) -> Result<Server> {
    if config.abort_incomplete_after.is_zero() {
        bail!("the age after which incomplete uploads are aborted must be above zero");
    }
    std::fs::create_dir_all(&config.root).with_context(|| format!("create store root {}", config.root.display()))?;
    for bucket in &config.buckets {
        ensure_bucket(&config.root, bucket)?;
    }
    let fs = s3s_fs::FileSystem::new(&config.root)
        .map_err(|e| anyhow!("open store root {}: {e:?}", config.root.display()))?;
    let layout = Layout::new(&config.root).with_context(|| format!("resolve store root {}", config.root.display()))?;
    let uploads = Arc::new(Uploads::new(layout));
    let mut builder = S3ServiceBuilder::new(Store::new(fs, uploads.clone()));
    builder.set_auth(SimpleAuth::from_single(config.access_key_id.clone(), config.secret_access_key.clone()));
    let s3 = builder.build();

    // The reaper stops when the last clone of the service (and this sender) is gone.
    let (alive, stopped) = oneshot::channel::<()>();
    let alive = Arc::new(alive);
    tokio::spawn(reaper::run(uploads, config.abort_incomplete_after, stopped));

    let faults = config.faults.clone();
    let service = hyper::service::service_fn(move |request: http::Request<hyper::body::Incoming>| {
        let (s3, faults, _alive) = (s3.clone(), faults.clone(), alive.clone());
        async move {
            if let Some(part) = faults.failing(&request) {
                tracing::warn!(part, "store: injected UploadPart failure");
                let body = format!(
                    "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>InternalError</Code>\
                     <Message>injected fault: UploadPart {part} fails</Message></Error>"
                );
                return Ok(xml_error(500, body));
            }
            let (mut parts, body) = request.into_parts();
            let checked = presigned::check_length(&parts.method, &parts.headers)
                .and_then(|()| presigned::check(parts.uri.query(), &mut parts.headers));
            match checked {
                Ok(dropped) if !dropped.is_empty() => {
                    tracing::info!(path = parts.uri.path(), ?dropped, "store: unsigned object attributes not kept");
                }
                Ok(_) => {}
                Err(refusal) => {
                    tracing::info!(
                        method = %parts.method,
                        path = parts.uri.path(),
                        message = refusal.message,
                        headers_not_signed = refusal.headers_not_signed.as_deref().unwrap_or(""),
                        "store: request refused"
                    );
                    return Ok(xml_error(refusal.status(), refusal.xml()));
                }
            }
            let request = http::Request::from_parts(parts, body);
            hyper::service::Service::call(&s3, request).await.map(|r| r.map(Either::Left))
        }
    });
    let server = serve::spawn("store", config.listen, service).await?;
    tracing::info!(
        url = %server.url(),
        root = %config.root.display(),
        abort_incomplete_after = ?config.abort_incomplete_after,
        "S3 store listening"
    );
    Ok(server)
}
