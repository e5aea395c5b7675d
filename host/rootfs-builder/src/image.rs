//! Base images: reading an image from disk ([`open`]) and laying its layers
//! into a [`Tree`] ([`apply`]).
//!
//! Three kinds of input, told apart by content, not by file name:
//! - an **OCI image layout** (a directory with `oci-layout` and
//!   `index.json`, or a tar of one, as `docker save` of Docker 25+ and
//!   `snapsign_dev_stack::registry`'s cache write): blobs are checked against the
//!   sha256 digest and size of their descriptors before anything is applied;
//! - a **`docker save` archive** (a tar with `manifest.json`, the config and
//!   the layers it names): the layers are checked against the config's
//!   `rootfs.diff_ids` as they are applied;
//! - a **plain rootfs tarball** (`tar`, `tar.gz`, `tar.zst`): one layer, an
//!   empty config.
//!
//! An index with several manifests gives its linux/amd64 one. Layers are
//! tar, tar+gzip or tar+zstd, known by their magic bytes. [`apply`] follows
//! the OCI whiteout rules and refuses hostile entries (see [`apply`]).

use std::path::Path;

use anyhow::{Context as _, Result, anyhow, bail};

use crate::snapshot::ImageConfig;
use crate::tree::Tree;

mod apply;
pub mod oci;
mod source;

pub use apply::{ApplyLimits, ApplyStats};
pub use source::Compression;

use oci::{ConfigFile, Descriptor, DockerArchiveImage, Index, ManifestKind, Platform};
use source::{Source, TarIndex};

/// What kind of input an image came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OciLayout,
    DockerArchive,
    RootfsTar,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::OciLayout => "OCI image layout",
            Format::DockerArchive => "docker save archive",
            Format::RootfsTar => "rootfs tarball",
        }
    }
}

/// One layer: a tar (maybe compressed) in the image's source.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The file in the source (`blobs/sha256/…`, `<id>/layer.tar`); empty for a rootfs tarball.
    pub member: String,
    /// The descriptor's digest (of the stored, maybe compressed, blob), when the format gives one.
    pub digest: Option<String>,
    /// The config's `rootfs.diff_ids` entry (sha256 of the uncompressed tar).
    pub diff_id: Option<String>,
    pub media_type: Option<String>,
    pub size: u64,
}

impl Layer {
    /// `layer 2 (sha256:…)` for messages.
    pub fn describe(&self, index: usize) -> String {
        match (&self.digest, self.member.is_empty()) {
            (Some(digest), _) => format!("layer {} ({digest})", index + 1),
            (None, false) => format!("layer {} ({})", index + 1, self.member),
            (None, true) => format!("layer {}", index + 1),
        }
    }
}

/// An image read from disk: its config and its layers, bottom first.
#[derive(Debug)]
pub struct Image {
    pub format: Format,
    pub config: ImageConfig,
    pub layers: Vec<Layer>,
    /// The image manifest's digest (OCI layout).
    pub manifest_digest: Option<String>,
    /// The config's os/architecture, when there is a config.
    pub platform: Option<Platform>,
    /// What `open` chose or noticed (the platform picked, a foreign architecture).
    pub notes: Vec<String>,
    source: Source,
}

impl Image {
    /// Where the image was read from.
    pub fn location(&self) -> String {
        self.source.display()
    }
}

/// Reads the image at `path`. An OCI layout or `docker save` archive holding
/// several images is an error naming them: use [`open_selected`].
pub fn open(path: &Path) -> Result<Image> {
    open_inner(path, None)
}

/// [`open`], choosing the image by manifest digest (`sha256:…`) or by name
/// (the OCI `org.opencontainers.image.ref.name` / `io.containerd.image.name`
/// annotation of an index.json entry, or a `docker save` `RepoTags` entry).
pub fn open_selected(path: &Path, which: &str) -> Result<Image> {
    open_inner(path, Some(which))
}

fn open_inner(path: &Path, which: Option<&str>) -> Result<Image> {
    let meta = std::fs::metadata(path).with_context(|| format!("open the image {}", path.display()))?;
    let source = if meta.is_dir() { Source::Dir(path.to_owned()) } else { Source::Tar(TarIndex::read(path)?) };
    let image = if source.exists(oci::OCI_LAYOUT_FILE) && source.exists(oci::OCI_INDEX_FILE) {
        open_layout(source, which)
    } else if source.exists(oci::DOCKER_MANIFEST_FILE) {
        open_docker(source, which)
    } else if let Source::Dir(dir) = source {
        bail!(
            "{} is a directory but neither an OCI image layout (no {} and {}) nor an unpacked docker save \
             archive (no {}); a rootfs directory has to be packed into a tar first",
            dir.display(),
            oci::OCI_LAYOUT_FILE,
            oci::OCI_INDEX_FILE,
            oci::DOCKER_MANIFEST_FILE
        )
    } else {
        if which.is_some() {
            bail!("{} is a plain rootfs tarball: it holds one image, there is nothing to select", path.display());
        }
        let size = meta.len();
        Ok(Image {
            format: Format::RootfsTar,
            config: ImageConfig::default(),
            layers: vec![Layer { member: String::new(), digest: None, diff_id: None, media_type: None, size }],
            manifest_digest: None,
            platform: None,
            notes: Vec::new(),
            source,
        })
    };
    image.with_context(|| format!("read the image {}", path.display()))
}

fn open_layout(source: Source, which: Option<&str>) -> Result<Image> {
    let layout = source.read_small(oci::OCI_LAYOUT_FILE, 1 << 16)?;
    let layout: serde_json::Value =
        serde_json::from_slice(&layout).map_err(|e| anyhow!("{} is not JSON: {e}", oci::OCI_LAYOUT_FILE))?;
    let version = layout["imageLayoutVersion"].as_str().unwrap_or_default();
    if !version.starts_with("1.") {
        bail!("{} says imageLayoutVersion {version:?}; version 1.x is supported", oci::OCI_LAYOUT_FILE);
    }
    let index: Index = serde_json::from_slice(&source.read_small(oci::OCI_INDEX_FILE, oci::MAX_JSON_BYTES)?)
        .map_err(|e| anyhow!("{} is not an image index: {e}", oci::OCI_INDEX_FILE))?;
    let mut notes = Vec::new();
    let top = choose_top(&index, which, &mut notes)?;
    let (manifest_digest, manifest) = resolve_manifest(&source, top, &mut notes, 0)?;

    let config_bytes = read_blob(&source, &manifest.config, "the config")?;
    let config_file = ConfigFile::parse(&config_bytes)?;
    let diff_ids = config_file.rootfs.as_ref().map(|r| r.diff_ids.clone()).unwrap_or_default();
    if !diff_ids.is_empty() && diff_ids.len() != manifest.layers.len() {
        bail!(
            "the manifest lists {} layers but the config's rootfs.diff_ids {}",
            manifest.layers.len(),
            diff_ids.len()
        );
    }
    let mut layers = Vec::with_capacity(manifest.layers.len());
    for (i, descriptor) in manifest.layers.iter().enumerate() {
        check_layer_media_type(&descriptor.media_type, i)?;
        let member = blob_path(&descriptor.digest)?;
        verify_blob(&source, descriptor, &format!("layer {}", i + 1))?;
        layers.push(Layer {
            member,
            digest: Some(descriptor.digest.clone()),
            diff_id: diff_ids.get(i).cloned(),
            media_type: Some(descriptor.media_type.clone()),
            size: descriptor.size,
        });
    }
    let platform = config_file.platform();
    note_platform(&platform, &mut notes);
    Ok(Image {
        format: Format::OciLayout,
        config: config_file.image_config(),
        layers,
        manifest_digest: Some(manifest_digest),
        platform: Some(platform),
        notes,
        source,
    })
}

/// The entry of index.json to open.
fn choose_top<'a>(index: &'a Index, which: Option<&str>, notes: &mut Vec<String>) -> Result<&'a Descriptor> {
    if let Some(which) = which {
        return index.manifests.iter().find(|d| d.digest == which || d.ref_name() == Some(which)).ok_or_else(|| {
            anyhow!(
                "index.json has no image {which}; it has: {}",
                list(index.manifests.iter().map(Descriptor::describe))
            )
        });
    }
    match index.manifests.as_slice() {
        [] => bail!("index.json lists no images"),
        [only] => Ok(only),
        several => {
            // Several platforms of one image (no names, or one name): pick ours.
            let mut names: Vec<&str> = several.iter().filter_map(Descriptor::ref_name).collect();
            names.dedup();
            if names.len() <= 1 && several.iter().all(|d| d.platform.is_some()) {
                let chosen = oci::select_platform(index, "index.json")?;
                notes.push(format!("picked {} of {} platforms in index.json", chosen.describe(), several.len()));
                return Ok(chosen);
            }
            bail!(
                "index.json holds {} images; choose one by digest or name: {}",
                several.len(),
                list(several.iter().map(Descriptor::describe))
            )
        }
    }
}

/// Follows indexes down to an image manifest (picking linux/amd64 in each).
fn resolve_manifest(
    source: &Source,
    descriptor: &Descriptor,
    notes: &mut Vec<String>,
    depth: usize,
) -> Result<(String, oci::Manifest)> {
    if depth > 4 {
        bail!("indexes nest more than 4 deep at {}", descriptor.digest);
    }
    let bytes = read_blob(source, descriptor, "the manifest")?;
    match oci::parse_manifest(&bytes).with_context(|| format!("manifest {}", descriptor.digest))? {
        ManifestKind::Image(manifest) => Ok((descriptor.digest.clone(), manifest)),
        ManifestKind::Index(index) => {
            let what = format!("the image index {}", descriptor.digest);
            let chosen = oci::select_platform(&index, &what)?;
            if index.manifests.len() > 1 {
                notes.push(format!(
                    "picked {} of the {} manifests of {} ({})",
                    chosen.platform.as_ref().map_or_else(|| chosen.digest.clone(), Platform::to_string),
                    index.manifests.len(),
                    descriptor.digest,
                    list(index.manifests.iter().filter_map(|d| d.platform.as_ref()).map(Platform::to_string)),
                ));
            }
            resolve_manifest(source, chosen, notes, depth + 1)
        }
    }
}

fn list(items: impl Iterator<Item = String>) -> String {
    items.collect::<Vec<_>>().join(", ")
}

/// `blobs/sha256/<hex>`.
pub fn blob_path(digest: &str) -> Result<String> {
    Ok(format!("blobs/sha256/{}", oci::sha256_hex(digest)?))
}

/// Reads a small blob (manifest, config) whole and checks it against its descriptor.
fn read_blob(source: &Source, descriptor: &Descriptor, what: &str) -> Result<Vec<u8>> {
    let path = blob_path(&descriptor.digest)?;
    if descriptor.size > oci::MAX_JSON_BYTES {
        bail!(
            "{what} {} is {} bytes, more than the {} accepted",
            descriptor.digest,
            descriptor.size,
            oci::MAX_JSON_BYTES
        );
    }
    let bytes = source.read_small(&path, oci::MAX_JSON_BYTES).with_context(|| format!("read {what}"))?;
    let actual = oci::sha256_digest(&bytes);
    if actual != descriptor.digest || bytes.len() as u64 != descriptor.size {
        bail!(digest_mismatch(what, &path, descriptor, &actual, bytes.len() as u64));
    }
    Ok(bytes)
}

/// Hashes a (large) blob by streaming and checks it against its descriptor.
fn verify_blob(source: &Source, descriptor: &Descriptor, what: &str) -> Result<()> {
    let path = blob_path(&descriptor.digest)?;
    let (mut reader, _) = source.open(&path).with_context(|| format!("read {what}"))?;
    let mut hashing = crate::archive::HashingWriter::new(std::io::sink());
    std::io::copy(&mut reader, &mut hashing).with_context(|| format!("read {what} {path}"))?;
    let (_, digest, size) = hashing.finish();
    let actual = format!("sha256:{}", hex::encode(digest));
    if actual != descriptor.digest || size != descriptor.size {
        bail!(digest_mismatch(what, &path, descriptor, &actual, size));
    }
    Ok(())
}

fn digest_mismatch(what: &str, path: &str, descriptor: &Descriptor, actual: &str, size: u64) -> String {
    format!(
        "{what} {path} does not match its descriptor: the descriptor says {} ({} bytes), the blob is {actual} \
         ({size} bytes); the image is corrupt or was tampered with",
        descriptor.digest, descriptor.size
    )
}

fn check_layer_media_type(media_type: &str, index: usize) -> Result<()> {
    // OCI (`…image.layer.v1.tar[+gzip|+zstd]`, nondistributable too), Docker
    // (`…image.rootfs.diff.tar.gzip`, foreign layers) or none at all.
    if media_type.is_empty() || media_type.contains(".tar") {
        return Ok(());
    }
    bail!("layer {} has media type {media_type}, which is not a filesystem layer (a tar)", index + 1)
}

fn note_platform(platform: &Platform, notes: &mut Vec<String>) {
    let known = !platform.os.is_empty() || !platform.architecture.is_empty();
    if known && (platform.os != oci::WANTED_OS || platform.architecture != oci::WANTED_ARCHITECTURE) {
        notes.push(format!(
            "the image is for {platform}, not {}/{}: its programs may not run here",
            oci::WANTED_OS,
            oci::WANTED_ARCHITECTURE
        ));
    }
}

fn open_docker(source: Source, which: Option<&str>) -> Result<Image> {
    let bytes = source.read_small(oci::DOCKER_MANIFEST_FILE, oci::MAX_JSON_BYTES)?;
    let images: Vec<DockerArchiveImage> = serde_json::from_slice(&bytes)
        .map_err(|e| anyhow!("{} is not a docker save manifest: {e}", oci::DOCKER_MANIFEST_FILE))?;
    let tags = |image: &DockerArchiveImage| image.repo_tags.clone().unwrap_or_default();
    let describe = |image: &DockerArchiveImage| {
        let tags = tags(image);
        if tags.is_empty() { image.config.clone() } else { tags.join(" ") }
    };
    let image = match (which, images.as_slice()) {
        (Some(which), _) => images
            .iter()
            .find(|i| tags(i).iter().any(|t| t == which) || i.config.contains(which.trim_start_matches("sha256:")))
            .ok_or_else(|| {
                anyhow!("the archive has no image {which}; it has: {}", list(images.iter().map(describe)))
            })?,
        (None, [only]) => only,
        (None, []) => bail!("{} lists no images", oci::DOCKER_MANIFEST_FILE),
        (None, several) => bail!(
            "the archive holds {} images; choose one by tag: {}",
            several.len(),
            list(several.iter().map(describe))
        ),
    };
    let config_bytes = source
        .read_small(&image.config, oci::MAX_JSON_BYTES)
        .with_context(|| format!("read the config {}", image.config))?;
    let config_file = ConfigFile::parse(&config_bytes)?;
    let diff_ids = config_file.rootfs.as_ref().map(|r| r.diff_ids.clone()).unwrap_or_default();
    if !diff_ids.is_empty() && diff_ids.len() != image.layers.len() {
        bail!(
            "{} lists {} layers but the config's rootfs.diff_ids {}",
            oci::DOCKER_MANIFEST_FILE,
            image.layers.len(),
            diff_ids.len()
        );
    }
    let mut layers = Vec::with_capacity(image.layers.len());
    for (i, member) in image.layers.iter().enumerate() {
        let (_, size) = source.open(member).with_context(|| format!("find layer {} ({member})", i + 1))?;
        layers.push(Layer {
            member: member.clone(),
            digest: None,
            diff_id: diff_ids.get(i).cloned(),
            media_type: None,
            size,
        });
    }
    let mut notes = Vec::new();
    let platform = config_file.platform();
    note_platform(&platform, &mut notes);
    Ok(Image {
        format: Format::DockerArchive,
        config: config_file.image_config(),
        layers,
        manifest_digest: None,
        platform: Some(platform),
        notes,
        source,
    })
}

/// Applies the image's layers to `tree` with the default [`ApplyLimits`].
pub fn apply(image: &Image, tree: &mut Tree) -> Result<ApplyStats> {
    apply_with(image, tree, &ApplyLimits::default())
}

/// Applies the image's layers to `tree`, bottom first: see [`apply`](apply::apply_layers).
pub fn apply_with(image: &Image, tree: &mut Tree, limits: &ApplyLimits) -> Result<ApplyStats> {
    apply::apply_layers(image, tree, limits)
}

impl Image {
    /// The layer's bytes as stored (maybe compressed).
    fn open_layer(&self, index: usize) -> Result<Box<dyn std::io::Read + Send>> {
        let layer = &self.layers[index];
        match (&self.source, self.format) {
            (Source::Tar(tar), Format::RootfsTar) => {
                let path = tar.path();
                let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
                Ok(Box::new(std::io::BufReader::new(file)))
            }
            _ => Ok(self.source.open(&layer.member)?.0),
        }
    }
}

#[cfg(test)]
mod tests;
