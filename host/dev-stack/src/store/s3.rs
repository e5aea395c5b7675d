//! Our `S3` implementation: s3s-fs with S3's rules it lacks added in front
//! (keys the store can hold, copy sources inside a bucket) and S3's
//! multipart semantics in place of its own (see `multipart`).

use std::sync::Arc;

use s3s::dto::*;
use s3s::{S3, S3Error, S3Request, S3Response, S3Result, s3_error};
use s3s_fs::FileSystem;

use super::keys;
use super::multipart::{Complete, MAX_PART_NUMBER, Uploads};

/// s3s-fs behind the store's rules.
pub struct Store {
    fs: Arc<FileSystem>,
    uploads: Arc<Uploads>,
}

impl Store {
    /// Wraps `fs`, whose root `uploads` describes.
    pub fn new(fs: FileSystem, uploads: Arc<Uploads>) -> Self {
        Store { fs: Arc::new(fs), uploads }
    }
}

fn access_key<T>(req: &S3Request<T>) -> Option<&str> {
    req.credentials.as_ref().map(|c| c.access_key.as_str())
}

/// A copy source must be an object this store could hold, in a real bucket:
/// `/snapshots/../.upload-<id>.json` named s3s-fs's own files.
fn check_copy_source(source: &CopySource) -> Result<(), S3Error> {
    match source {
        CopySource::Bucket { bucket, key, .. } => {
            if !snapsign::signer::config::valid_bucket(bucket) {
                return Err(s3_error!(InvalidArgument, "copy source bucket {bucket:?} is not a valid bucket name"));
            }
            keys::check(bucket, key)
        }
        // s3s-fs answers NotImplemented.
        _ => Ok(()),
    }
}

fn check_part_number(part: i32) -> Result<(), S3Error> {
    if (1..=MAX_PART_NUMBER).contains(&part) {
        return Ok(());
    }
    Err(s3_error!(
        InvalidArgument,
        "Part number must be an integer between 1 and {MAX_PART_NUMBER}, inclusive (got {part})"
    ))
}

#[async_trait::async_trait]
impl S3 for Store {
    async fn create_bucket(&self, req: S3Request<CreateBucketInput>) -> S3Result<S3Response<CreateBucketOutput>> {
        self.fs.create_bucket(req).await
    }

    async fn delete_bucket(&self, req: S3Request<DeleteBucketInput>) -> S3Result<S3Response<DeleteBucketOutput>> {
        self.fs.delete_bucket(req).await
    }

    async fn head_bucket(&self, req: S3Request<HeadBucketInput>) -> S3Result<S3Response<HeadBucketOutput>> {
        self.fs.head_bucket(req).await
    }

    async fn get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.fs.get_bucket_location(req).await
    }

    async fn list_buckets(&self, req: S3Request<ListBucketsInput>) -> S3Result<S3Response<ListBucketsOutput>> {
        self.fs.list_buckets(req).await
    }

    async fn list_objects(&self, req: S3Request<ListObjectsInput>) -> S3Result<S3Response<ListObjectsOutput>> {
        self.fs.list_objects(req).await
    }

    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.fs.list_objects_v2(req).await
    }

    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        keys::check(&req.input.bucket, &req.input.key)?;
        self.fs.get_object(req).await
    }

    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        keys::check(&req.input.bucket, &req.input.key)?;
        self.fs.head_object(req).await
    }

    async fn put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        keys::check(&req.input.bucket, &req.input.key)?;
        self.uploads.forget_record(&req.input.bucket, &req.input.key)?;
        self.fs.put_object(req).await
    }

    async fn delete_object(&self, req: S3Request<DeleteObjectInput>) -> S3Result<S3Response<DeleteObjectOutput>> {
        keys::check(&req.input.bucket, &req.input.key)?;
        self.fs.delete_object(req).await
    }

    async fn delete_objects(&self, req: S3Request<DeleteObjectsInput>) -> S3Result<S3Response<DeleteObjectsOutput>> {
        for object in &req.input.delete.objects {
            keys::check(&req.input.bucket, &object.key)?;
        }
        self.fs.delete_objects(req).await
    }

    async fn copy_object(&self, req: S3Request<CopyObjectInput>) -> S3Result<S3Response<CopyObjectOutput>> {
        keys::check(&req.input.bucket, &req.input.key)?;
        check_copy_source(&req.input.copy_source)?;
        self.fs.copy_object(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        keys::check(&req.input.bucket, &req.input.key)?;
        self.fs.create_multipart_upload(req).await
    }

    async fn upload_part(&self, req: S3Request<UploadPartInput>) -> S3Result<S3Response<UploadPartOutput>> {
        keys::check(&req.input.bucket, &req.input.key)?;
        check_part_number(req.input.part_number)?;
        let id = Uploads::parse_id(&req.input.upload_id)?;
        self.uploads.check_open(&id, access_key(&req), &req.input.bucket, &req.input.key)?;
        let part = req.input.part_number;
        let (fs, uploads) = (self.fs.clone(), self.uploads.clone());
        // Its own task, holding the part's lock to the end: a client that
        // hangs up must not let another upload of the part in while this
        // one's rename may still land (see `multipart`, part records).
        let task = tokio::spawn(async move {
            let _held = uploads.part_lock(id, part).lock_owned().await;
            uploads.forget_part(id, part);
            let written = fs.upload_part(req).await?;
            let etag = written.output.e_tag.as_ref().map(|e| e.value().to_owned());
            uploads.part_written(id, part, etag.as_deref()).await?;
            Ok(written)
        });
        task.await.map_err(|e| s3_error!(InternalError, "run UploadPart: {e}"))?
    }

    async fn upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        keys::check(&req.input.bucket, &req.input.key)?;
        check_copy_source(&req.input.copy_source)?;
        check_part_number(req.input.part_number)?;
        let id = Uploads::parse_id(&req.input.upload_id)?;
        self.uploads.check_open(&id, access_key(&req), &req.input.bucket, &req.input.key)?;
        let part = req.input.part_number;
        let (fs, uploads) = (self.fs.clone(), self.uploads.clone());
        let task = tokio::spawn(async move {
            let _held = uploads.part_lock(id, part).lock_owned().await;
            uploads.forget_part(id, part);
            let written = fs.upload_part_copy(req).await?;
            // No record: complete computes a copied part's MD5.
            uploads.part_written(id, part, None).await?;
            Ok::<_, S3Error>(written)
        });
        let written = task.await.map_err(|e| s3_error!(InternalError, "run UploadPartCopy: {e}"))??;
        Ok(written)
    }

    async fn list_parts(&self, req: S3Request<ListPartsInput>) -> S3Result<S3Response<ListPartsOutput>> {
        keys::check(&req.input.bucket, &req.input.key)?;
        let id = Uploads::parse_id(&req.input.upload_id)?;
        self.uploads.check_open(&id, access_key(&req), &req.input.bucket, &req.input.key)?;
        self.fs.list_parts(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        keys::check(&req.input.bucket, &req.input.key)?;
        let access_key = access_key(&req).map(str::to_owned);
        let input = req.input;
        let parts = input
            .multipart_upload
            .and_then(|m| m.parts)
            .unwrap_or_default()
            .into_iter()
            .map(|p| (p.part_number, p.e_tag.map(|e| e.value().to_owned())))
            .collect();
        let complete = Complete {
            upload_id: input.upload_id,
            bucket: input.bucket.clone(),
            key: input.key.clone(),
            access_key,
            parts,
        };
        let e_tag = self.uploads.complete(complete).await?;
        Ok(S3Response::new(CompleteMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            e_tag: Some(ETag::Strong(e_tag)),
            ..Default::default()
        }))
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        keys::check(&req.input.bucket, &req.input.key)?;
        let object = (req.input.bucket.as_str(), req.input.key.as_str());
        let parts = self.uploads.abort(&req.input.upload_id, access_key(&req), object).await?;
        tracing::debug!(upload_id = %req.input.upload_id, parts, "store: upload aborted");
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }
}
