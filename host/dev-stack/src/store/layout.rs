//! Where s3s-fs 0.14.1 keeps things under the store root. Our multipart
//! rules (complete, abort, the reaper) work on these files directly, so the
//! names must match `s3s_fs::FileSystem` exactly (its version is pinned).

use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use uuid::Uuid;

/// The files of one store root.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

/// The bytes s3s-fs adds around the base64 of bucket and key to name an
/// upload's attributes file: `.bucket-{b}.object-{k}.upload-{uuid}.metadata.json`.
/// It is the longest file name s3s-fs derives from a key, and it sits in one
/// directory entry, so it bounds the key (see `keys::max_key_bytes`).
pub const UPLOAD_ATTRS_NAME_OVERHEAD: usize =
    ".bucket-".len() + ".object-".len() + ".upload-".len() + 36 + ".metadata.json".len();

/// Length of unpadded base64 of `n` bytes.
pub const fn base64_len(n: usize) -> usize {
    (4 * n).div_ceil(3)
}

impl Layout {
    /// `root` as s3s-fs resolves it (absolute, canonical).
    pub fn new(root: &Path) -> std::io::Result<Self> {
        Ok(Layout { root: std::env::current_dir()?.join(root).canonicalize()? })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The upload record, `.upload-{id}.json` (JSON: the access key that created it).
    pub fn record(&self, id: &Uuid) -> PathBuf {
        self.root.join(format!(".upload-{id}.json"))
    }

    /// Prefix of every part file of an upload.
    pub fn part_prefix(id: &Uuid) -> String {
        format!(".upload_id-{id}.part-")
    }

    /// One part, `.upload_id-{id}.part-{n}`.
    pub fn part(&self, id: &Uuid, part: i32) -> PathBuf {
        self.root.join(format!("{}{part}", Self::part_prefix(id)))
    }

    /// Suffix of an upload's attributes file (its prefix names bucket and key).
    pub fn upload_attrs_suffix(id: &Uuid) -> String {
        format!(".upload-{id}.metadata.json")
    }

    /// Attributes (content type, user metadata) given at CreateMultipartUpload.
    pub fn upload_attrs(&self, bucket: &str, key: &str, id: &Uuid) -> PathBuf {
        self.root.join(format!(".bucket-{}.object-{}{}", b64(bucket), b64(key), Self::upload_attrs_suffix(id)))
    }

    /// Attributes of a stored object.
    pub fn object_attrs(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.join(format!(".bucket-{}.object-{}.metadata.json", b64(bucket), b64(key)))
    }

    /// Internal info of a stored object (its ETag).
    pub fn internal_info(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.join(format!(".bucket-{}.object-{}.internal.json", b64(bucket), b64(key)))
    }

    /// The object's bytes.
    pub fn object(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.join(bucket).join(key)
    }

    /// A temporary file. s3s-fs deletes `.tmp.*.internal.part` when it opens
    /// the root, so one left by a killed store goes away on restart.
    pub fn temp(&self, id: &Uuid, what: &str) -> PathBuf {
        self.root.join(format!(".tmp.{what}-{id}.internal.part"))
    }

    /// Decodes bucket and key from an upload's attributes file name.
    pub fn parse_upload_attrs(name: &str, id: &Uuid) -> Option<(String, String)> {
        let rest = name.strip_prefix(".bucket-")?.strip_suffix(&Self::upload_attrs_suffix(id))?;
        let (bucket, key) = rest.split_once(".object-")?;
        let decode = |s: &str| String::from_utf8(URL_SAFE_NO_PAD.decode(s).ok()?).ok();
        Some((decode(bucket)?, decode(key)?))
    }

    /// The upload id of a record file name `.upload-{id}.json`.
    pub fn parse_record(name: &str) -> Option<Uuid> {
        let id = name.strip_prefix(".upload-")?.strip_suffix(".json")?;
        Uuid::parse_str(id).ok().filter(|u| u.to_string() == id)
    }

    /// The upload id of a part file name `.upload_id-{id}.part-{n}`.
    pub fn parse_part(name: &str) -> Option<Uuid> {
        let rest = name.strip_prefix(".upload_id-")?;
        let (id, n) = rest.split_once(".part-")?;
        n.parse::<i32>().ok()?;
        Uuid::parse_str(id).ok().filter(|u| u.to_string() == id)
    }
}

fn b64(s: &str) -> String {
    URL_SAFE_NO_PAD.encode(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_s3s_fs() {
        let layout = Layout { root: PathBuf::from("/r") };
        let id = Uuid::parse_str("0f8fad5b-d9cb-469f-a165-70867728950e").unwrap();
        assert_eq!(layout.record(&id), Path::new("/r/.upload-0f8fad5b-d9cb-469f-a165-70867728950e.json"));
        assert_eq!(layout.part(&id, 3), Path::new("/r/.upload_id-0f8fad5b-d9cb-469f-a165-70867728950e.part-3"));
        let attrs = layout.upload_attrs("snaps", "a/b", &id);
        assert_eq!(
            attrs,
            Path::new("/r/.bucket-c25hcHM.object-YS9i.upload-0f8fad5b-d9cb-469f-a165-70867728950e.metadata.json")
        );
        let name = attrs.file_name().unwrap().to_str().unwrap();
        assert_eq!(name.len(), UPLOAD_ATTRS_NAME_OVERHEAD + base64_len(5) + base64_len(3));
        assert_eq!(Layout::parse_upload_attrs(name, &id), Some(("snaps".into(), "a/b".into())));
        assert_eq!(Layout::parse_record(".upload-0f8fad5b-d9cb-469f-a165-70867728950e.json"), Some(id));
        assert_eq!(Layout::parse_part(".upload_id-0f8fad5b-d9cb-469f-a165-70867728950e.part-12"), Some(id));
        assert_eq!(Layout::parse_record(".upload-nope.json"), None);
    }
}
