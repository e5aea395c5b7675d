//! One build, start to end: spec → Dockerfile → (parent) → tree → archive →
//! upload → metadata. The decisions live in the other modules; this file
//! sequences them and prints the build log.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Instant;

use anyhow::{Context as _, Result, anyhow, bail};
use snapsign::wire::{Download, Spec};

use crate::archive::{ParentIndex, ParentSnapshot, read_archive, write_archive_observed};
use crate::cli::BuildArgs;
use crate::context::Context;
use crate::download::{check_sha256, download_parent};
use crate::faults::Faults;
use crate::metadata::Built;
use crate::plan::{Action, Base, CopyFrom, CopyOp, RunOp, Stage, plan, stages_to_build};
use crate::snapshot::{FORMAT_VERSION, ImageConfig, SnapshotManifest};
use crate::step::{self, Confined, Ended};
use crate::tree::{CopyStats, Tree, remove_tree};
use crate::{dockerfile, http, human_bytes, upload};

/// How a build that did not fail ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Uploaded and metadata written.
    Done,
    /// Uploaded, then stopped by the `exit_nonzero` fault (no metadata).
    InjectedExit,
    /// Part URLs expired (a resumable build): the archive and the parts up
    /// are kept in [`RESUME_DIR`], the upload stays open; the message says
    /// what the caller does next.
    Interrupted(String),
}

/// Set to `1` by a caller that can sign fresh URLs for an open upload: part
/// URLs that expire then interrupt the build ([`Outcome::Interrupted`],
/// exit [`crate::EXIT_INTERRUPTED`]) instead of aborting the upload.
pub const RESUMABLE_ENV: &str = snapsign::image_build::command::BUILDER_RESUMABLE_ENV;
/// Set to `1` to resume an interrupted build with spec.json's fresh URLs.
pub const RESUME_ENV: &str = snapsign::image_build::command::BUILDER_RESUME_ENV;
/// Beside metadata.json: the interrupted build's archive and state.
pub const RESUME_DIR: &str = ".tl-rootfs-build-resume";

fn env_on(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| v == "1")
}

/// What an interrupted upload leaves for its resume (`RESUME_DIR/state.json`).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct ResumeState {
    upload_id: String,
    part_size_bytes: u64,
    sha256: String,
    size_bytes: u64,
    files: u64,
    /// Parts up, with their ETags.
    etags: Vec<(u32, String)>,
    expired_part: u32,
}

const RESUME_ARCHIVE: &str = "snapshot.tar.zst";

/// `BUILD/.tl-rootfs-build-resume`: made (mode 0700) or found, refusing
/// anything but a directory of this user that no one else may write (BUILD
/// itself is open to the sandbox user).
fn resume_dir(build_dir: &Path, create: bool) -> Result<PathBuf> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = build_dir.join(RESUME_DIR);
    if create {
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("create {}", dir.display())),
        }
    }
    let meta = fs::symlink_metadata(&dir)
        .with_context(|| format!("inspect {} (was the build interrupted?)", dir.display()))?;
    // SAFETY: geteuid cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() || meta.uid() != me || meta.mode() & 0o077 != 0 {
        bail!(
            "{} is not a directory of uid {me} that only it may use (owner {}, mode {:o}); refusing to keep or \
             read a resume there",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    Ok(dir)
}

/// Keeps what a resume needs and says what the caller does next.
fn interrupt(
    build_dir: &Path,
    archive: &Path,
    upload_id: &str,
    part_size: u64,
    i: &upload::Interrupted,
) -> Result<Outcome> {
    let dir = resume_dir(build_dir, true)?;
    let kept = dir.join(RESUME_ARCHIVE);
    if archive != kept {
        fs::rename(archive, &kept).with_context(|| format!("keep the archive as {}", kept.display()))?;
    }
    let state = ResumeState {
        upload_id: upload_id.to_owned(),
        part_size_bytes: part_size,
        sha256: i.summary.sha256.clone(),
        size_bytes: i.summary.size_bytes,
        files: i.summary.files,
        etags: i.etags.clone(),
        expired_part: i.expired.part,
    };
    let path = dir.join("state.json");
    fs::write(&path, serde_json::to_vec_pretty(&state).expect("state serializes"))
        .with_context(|| format!("write {}", path.display()))?;
    let total = i.summary.size_bytes.div_ceil(part_size.max(1)).max(1);
    Ok(Outcome::Interrupted(format!(
        "{} with {} of {total} parts of multipart upload {upload_id} up; the upload stays open for a resume with \
         fresh URLs of it (refresh_upload, then {RESUME_ENV}=1)",
        i.expired,
        i.etags.len()
    )))
}

/// [`interrupt`], or when keeping the resume fails, the upload aborted
/// and the error.
fn interrupt_or_abort(
    build_dir: &Path,
    archive: &Path,
    multipart: &snapsign::wire::S3Multipart,
    i: &upload::Interrupted,
) -> Result<Outcome> {
    interrupt(build_dir, archive, &multipart.upload_id, multipart.part_size_bytes, i).inspect_err(|_| {
        upload::abort(&http::agent(), multipart);
        remove_tree(&build_dir.join(RESUME_DIR));
    })
}

/// Resumes an interrupted build ([`RESUME_ENV`]): the kept archive goes up
/// through spec.json's fresh URLs for the same upload, then metadata.json
/// is written as by [`build`]. What was kept is checked first (the upload,
/// the part size, the part numbers, the archive's size and sha256).
pub fn resume(args: &BuildArgs, faults: &Faults) -> Result<Outcome> {
    let text = fs::read_to_string(&args.spec).with_context(|| format!("read the spec {}", args.spec.display()))?;
    let spec = Spec::from_json(&text).with_context(|| format!("parse the spec {}", args.spec.display()))?;
    let Some(snapsign::wire::Upload::S3Multipart(multipart)) = &spec.upload else {
        bail!("{RESUME_ENV}=1, but spec.upload is not an s3_multipart upload; only a multipart upload resumes");
    };
    for (field, url) in upload::urls(spec.upload.as_ref().expect("matched above")) {
        http::check_plain_http(&field, url).map_err(|m| anyhow!(m))?;
    }
    let build_dir = build_dir(args);
    let dir = resume_dir(&build_dir, false)?;
    let archive = dir.join(RESUME_ARCHIVE);
    let checked = check_resume(&dir, &archive, multipart);
    let state = match checked {
        Ok(state) => state,
        Err(err) => {
            remove_tree(&dir);
            return Err(err);
        }
    };
    let summary =
        crate::archive::ArchiveSummary { sha256: state.sha256, size_bytes: state.size_bytes, files: state.files };
    let interrupted =
        upload::Interrupted { summary, etags: state.etags, expired: upload::UrlExpired { part: state.expired_part } };
    let summary = match upload::resume(&http::agent(), multipart, &archive, interrupted) {
        Ok(summary) => summary,
        Err(err) => {
            if let Some(again) = err.downcast_ref::<upload::Interrupted>() {
                return interrupt_or_abort(&build_dir, &archive, multipart, again);
            }
            remove_tree(&dir);
            return Err(err.context("resume the snapshot upload"));
        }
    };
    remove_tree(&dir);
    let work = WorkDir::create(&build_dir)?;
    write_metadata(&spec, args, faults, &work.0, &summary)
}

/// The kept state, if it fits `multipart` and the kept archive.
fn check_resume(dir: &Path, archive: &Path, multipart: &snapsign::wire::S3Multipart) -> Result<ResumeState> {
    let path = dir.join("state.json");
    let state: ResumeState =
        serde_json::from_slice(&fs::read(&path).with_context(|| format!("read {}", path.display()))?)
            .with_context(|| format!("parse {}", path.display()))?;
    if state.upload_id != multipart.upload_id || state.part_size_bytes != multipart.part_size_bytes {
        bail!(
            "spec.upload is upload {} of {}-byte parts, but the interrupted upload is {} of {}-byte parts: sign \
             fresh URLs for that one (refresh_upload)",
            multipart.upload_id,
            multipart.part_size_bytes,
            state.upload_id,
            state.part_size_bytes
        );
    }
    let total = state.size_bytes.div_ceil(state.part_size_bytes.max(1)).max(1);
    let mut numbers: Vec<u32> = state.etags.iter().map(|(n, _)| *n).collect();
    numbers.sort_unstable();
    numbers.dedup();
    if numbers.len() != state.etags.len() || numbers.iter().any(|n| !(1..=total).contains(&u64::from(*n))) {
        bail!("{} lists parts {numbers:?}, not distinct parts of 1..={total}", path.display());
    }
    // The archive is read back whole: its sha256 goes to metadata.json, so it must be what was written.
    let mut file = fs::File::open(archive).with_context(|| format!("open {}", archive.display()))?;
    let (mut hasher, mut size, mut buf) = (sha2::Sha256::default(), 0u64, vec![0u8; 1 << 20]);
    loop {
        let n = std::io::Read::read(&mut file, &mut buf).with_context(|| format!("read {}", archive.display()))?;
        if n == 0 {
            break;
        }
        sha2::Digest::update(&mut hasher, &buf[..n]);
        size += n as u64;
    }
    let sha256 = hex::encode(sha2::Digest::finalize(hasher));
    if size != state.size_bytes || sha256 != state.sha256 {
        bail!(
            "the kept archive {} is {size} bytes with sha256 {sha256}, not the {} bytes with sha256 {} that were \
             written",
            archive.display(),
            state.size_bytes,
            state.sha256
        );
    }
    Ok(state)
}

fn build_dir(args: &BuildArgs) -> PathBuf {
    match args.metadata_out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// The build's scratch directory next to metadata.json, removed when dropped.
struct WorkDir(PathBuf);

impl WorkDir {
    fn create(build_dir: &Path) -> Result<WorkDir> {
        // Unique per call too: a host may run several builds in one process.
        static CALLS: AtomicU32 = AtomicU32::new(0);
        let call = CALLS.fetch_add(1, Ordering::Relaxed);
        let path = build_dir.join(format!(".tl-rootfs-build-{}-{call}", std::process::id()));
        if path.exists() {
            remove_tree(&path);
        }
        fs::create_dir_all(&path).with_context(|| format!("create the work directory {}", path.display()))?;
        Ok(WorkDir(path))
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        remove_tree(&self.0);
    }
}

pub fn build(args: &BuildArgs, faults: &Faults) -> Result<Outcome> {
    let text = fs::read_to_string(&args.spec).with_context(|| format!("read the spec {}", args.spec.display()))?;
    let spec = Spec::from_json(&text).with_context(|| format!("parse the spec {}", args.spec.display()))?;
    println!(
        "tl-rootfs-build {} (snapsign reference builder): build {}, snapshot {}, {} node",
        env!("CARGO_PKG_VERSION"),
        spec.build_id.as_deref().unwrap_or("-"),
        spec.snapshot_id,
        spec.rootfs_node_kind
    );
    if !args.ignored.is_empty() {
        println!("note: ignoring arguments not meant for this builder: {}", args.ignored.join(" "));
    }
    if !faults.is_empty() {
        println!("note: fault injection is on: {faults:?}");
    }
    let diff = match spec.rootfs_node_kind.as_str() {
        "base" => false,
        "diff" => true,
        other => bail!("spec.rootfsNodeKind is \"{other}\"; expected \"base\" or \"diff\""),
    };
    if diff && spec.parent.is_none() {
        bail!("spec.rootfsNodeKind is \"diff\" but spec.parent is missing (a diff build needs its parent)");
    }
    let upload = spec
        .upload
        .as_ref()
        .ok_or_else(|| anyhow!("spec.upload is missing: there is nowhere to upload the snapshot"))?;
    for (field, url) in upload::urls(upload) {
        http::check_plain_http(&field, url).map_err(|m| anyhow!(m))?;
    }
    if let Some(Download::SingleGet(get)) = spec.parent.as_ref().and_then(|p| p.download.as_ref()) {
        http::check_plain_http("spec.parent.download.url", &get.url).map_err(|m| anyhow!(m))?;
    }

    let build_dir = build_dir(args);
    fs::create_dir_all(&build_dir).with_context(|| format!("create {}", build_dir.display()))?;
    let work = WorkDir::create(&build_dir)?;
    let (tree, config, parent_index) = match &spec.import_image_reference {
        Some(reference) => {
            if diff {
                bail!(
                    "spec.importImageReference is {reference}, but spec.rootfsNodeKind is \"diff\": an import is a base build"
                );
            }
            let (tree, config) = import(&spec, &args.spec, reference, &work.0)?;
            (tree, config, None)
        }
        None => build_stages(&spec, args, &work.0, diff)?,
    };

    let specials = tree.specials().context("list the tree")?;
    if !specials.is_empty() {
        println!("note: not kept in the snapshot (not a file, directory or symlink): /{}", specials.join(", /"));
    }
    let entries = tree.entries().context("list the tree")?;
    let tree_bytes: u64 = entries.iter().map(|e| e.size).sum();
    println!(
        "Rootfs: {} entries, {} of files (rootfsDiskBytes {})",
        entries.len(),
        human_bytes(tree_bytes),
        spec.rootfs_disk_bytes
    );
    if tree_bytes > spec.rootfs_disk_bytes {
        bail!(
            "the rootfs holds {tree_bytes} bytes of files, more than spec.rootfsDiskBytes ({})",
            spec.rootfs_disk_bytes
        );
    }
    let parent_manifest_uri = if diff { spec.parent.as_ref().map(|p| p.parent_manifest_uri.clone()) } else { None };
    let manifest = SnapshotManifest {
        format_version: FORMAT_VERSION.into(),
        snapshot_id: spec.snapshot_id.clone(),
        node_kind: spec.rootfs_node_kind.clone(),
        parent_manifest_uri: parent_manifest_uri.clone(),
        config,
        files: 0,
    };
    let archive_path = work.0.join("snapshot.tar.zst");
    println!(
        "Writing the snapshot archive ({FORMAT_VERSION}{})",
        if diff { ", changes over the parent only" } else { "" }
    );
    let options = upload::PartOptions { resumable: env_on(RESUMABLE_ENV), delay: faults.delay_parts };
    let written = upload::write_and_upload(&http::agent(), upload, &archive_path, options, |observe| {
        let summary = write_archive_observed(&archive_path, manifest, &tree, parent_index.as_ref(), observe)
            .context("write the snapshot archive")?;
        println!(
            "Snapshot archive: {} entries, {} ({} bytes), sha256 {}",
            summary.files,
            human_bytes(summary.size_bytes),
            summary.size_bytes,
            summary.sha256
        );
        Ok(summary)
    });
    let summary = match written {
        Ok(summary) => summary,
        Err(err) => {
            if let (Some(interrupted), snapsign::wire::Upload::S3Multipart(multipart)) =
                (err.downcast_ref::<upload::Interrupted>(), upload)
            {
                return interrupt_or_abort(&build_dir, &archive_path, multipart, interrupted);
            }
            return Err(err.context("upload the snapshot archive"));
        }
    };
    drop(tree);
    write_metadata(&spec, args, faults, &work.0, &summary)
}

/// After the upload: metadata.json from the spec and the archive's summary.
fn write_metadata(
    spec: &Spec,
    args: &BuildArgs,
    faults: &Faults,
    work: &Path,
    summary: &crate::archive::ArchiveSummary,
) -> Result<Outcome> {
    if faults.exit_nonzero {
        return Ok(Outcome::InjectedExit);
    }
    let snapshot_uri = spec.snapshot_uri().map(str::to_owned);
    let diff = spec.rootfs_node_kind == "diff";
    let parent_manifest_uri = if diff { spec.parent.as_ref().map(|p| p.parent_manifest_uri.clone()) } else { None };
    let built = Built {
        snapshot_id: spec.snapshot_id.clone(),
        snapshot_uri: snapshot_uri.clone(),
        snapshot_size_bytes: summary.size_bytes,
        rootfs_disk_bytes: spec.rootfs_disk_bytes,
        rootfs_node_kind: spec.rootfs_node_kind.clone(),
        parent_manifest_uri,
        sha256: summary.sha256.clone(),
    };
    let json = serde_json::to_string_pretty(&faults.metadata_json(&built)).expect("metadata serializes");
    let temporary = work.join("metadata.json");
    fs::write(&temporary, json + "\n").with_context(|| format!("write {}", temporary.display()))?;
    fs::rename(&temporary, &args.metadata_out).with_context(|| format!("write {}", args.metadata_out.display()))?;
    if let Some(peak) = crate::peak_rss_bytes() {
        println!("Peak memory of the builder: {} (VmHWM)", human_bytes(peak));
    }
    match &snapshot_uri {
        Some(uri) => println!("Wrote {}: snapshot {uri}, sha256 {}", args.metadata_out.display(), summary.sha256),
        None => println!(
            "Wrote {} without snapshot_uri (neither spec.snapshotUri nor spec.upload.uri was given)",
            args.metadata_out.display()
        ),
    }
    Ok(Outcome::Done)
}

/// Builds the Dockerfile's stages in `work`: the final tree, its config and
/// (a diff build) the parent's entries.
fn build_stages(
    spec: &Spec,
    args: &BuildArgs,
    work: &Path,
    diff: bool,
) -> Result<(Tree, ImageConfig, Option<ParentIndex>)> {
    let instructions = dockerfile::parse(&spec.dockerfile);
    let stages = stages_to_build(&instructions).context("spec.dockerfile")?;
    let final_stage = stages.last().expect("a Dockerfile has a final stage");
    // The final FROM's template is the parent of a diff build. In a base build, a final FROM
    // that names an image is one the platform supplied in additionalLocalImages (a registry
    // image it imported): the build starts from its tree and the snapshot holds all of it.
    let parent_reference = match &final_stage.base {
        Base::Image(reference) if diff => Some(reference.clone()),
        _ => None,
    };
    if let (Some(base_image), Some(reference)) = (&spec.base_image, &parent_reference)
        && base_image != reference
    {
        println!(
            "note: spec.baseImage is {base_image} but the final FROM names {reference}; building FROM {reference}"
        );
    }

    let agent = http::agent();
    let mut builder = Stages {
        spec,
        spec_path: &args.spec,
        work,
        agent: &agent,
        diff,
        parent_reference,
        context: None,
        built: BTreeMap::new(),
        images: BTreeMap::new(),
        parent_index: None,
    };
    let count = stages.len();
    for (i, stage) in stages.iter().enumerate() {
        if count > 1 {
            println!("Stage {}/{count} : {} (line {})", i + 1, stage.label(), stage.from.line);
        }
        builder.build(stage, i + 1 == count)?;
    }
    let last = builder.built.remove(&final_stage.position).expect("the final stage was built");
    let (tree, config, parent_index) = (last.tree, last.config, builder.parent_index.take());
    drop(builder);
    Ok((tree, config, parent_index))
}

/// An image import (`spec.importImageReference` = `context:<path>`): the
/// image at that path of the build context (a `docker save` archive, an OCI
/// layout, a rootfs tarball) laid into a tree, with its config. The
/// Dockerfile is not read.
fn import(spec: &Spec, spec_path: &Path, reference: &str, work: &Path) -> Result<(Tree, ImageConfig)> {
    let Some(rel) = reference.strip_prefix("context:") else {
        bail!(
            "spec.importImageReference is {reference}: the reference builder imports an image from the build \
             context (context:<path>); a registry image is imported by the platform at prepare (build FROM it)"
        );
    };
    if rel.split('/').any(|part| part == "..") || rel.starts_with('/') {
        bail!("spec.importImageReference {reference}: the path must stay inside the build context");
    }
    let context = open_context(spec, spec_path)?;
    let path = context.root().join(rel);
    println!("Importing {} (spec.importImageReference {reference}; the Dockerfile is not read)", path.display());
    let image = crate::image::open(&path).with_context(|| format!("read the image {reference}"))?;
    for note in &image.notes {
        println!("note: {note}");
    }
    let mut tree = Tree::create(work.join("rootfs"))?;
    let stats = crate::image::apply(&image, &mut tree).with_context(|| format!("lay out the image {reference}"))?;
    for note in &stats.notes {
        println!("note: {note}");
    }
    println!(
        "Image {} ({}): {} layers, {} files ({}), {} whiteouts, {} opaque directories",
        image.location(),
        image.format.name(),
        stats.layers,
        stats.files,
        human_bytes(stats.bytes),
        stats.whiteouts,
        stats.opaque_dirs
    );
    Ok((tree, image.config))
}

/// A built stage (or a downloaded image COPY --from reads).
struct StageTree {
    tree: Tree,
    config: ImageConfig,
}

/// The stages of one build, built in order.
struct Stages<'a> {
    spec: &'a Spec,
    spec_path: &'a Path,
    work: &'a Path,
    agent: &'a ureq::Agent,
    diff: bool,
    /// The final stage's FROM template (the parent of a diff build).
    parent_reference: Option<String>,
    /// The build context, opened at the first COPY from it.
    context: Option<Context>,
    /// Stages built so far, by position.
    built: BTreeMap<usize, StageTree>,
    /// Templates `COPY --from=` read, by reference.
    images: BTreeMap<String, StageTree>,
    /// The final stage's parent entries (a diff build).
    parent_index: Option<ParentIndex>,
}

impl Stages<'_> {
    fn build(&mut self, stage: &Stage, is_final: bool) -> Result<()> {
        let dir = if is_final { self.work.join("rootfs") } else { self.work.join(format!("stage-{}", stage.position)) };
        let mut tree = Tree::create(dir)?;
        let base_config = match &stage.base {
            Base::Scratch => {
                if is_final && self.diff {
                    println!(
                        "note: FROM scratch in a diff build: the archive holds the whole tree as a layer over the parent"
                    );
                }
                ImageConfig::default()
            }
            Base::Image(reference) if Some(reference) == self.parent_reference.as_ref() => {
                let parent = self.spec.parent.as_ref().filter(|p| p.download.is_some()).ok_or_else(|| {
                    anyhow!(
                        "FROM {reference} needs parent.download in spec.json (a diff build); \
                         the platform or client did not provide it"
                    )
                })?;
                let download = parent.download.as_ref().expect("filtered above");
                // The layers below the parent first (a diff parent is one layer), then the parent.
                let mut index = ParentIndex::new();
                let layers = parent.ancestors.len();
                if parent.ancestors.iter().any(|a| a.download.is_none()) {
                    println!(
                        "note: the parent has {layers} layers below it, but the client did not sign their reads \
                         (spec.parent.ancestors[].download): building on the parent's own layer only"
                    );
                } else {
                    for (i, ancestor) in parent.ancestors.iter().enumerate() {
                        let get = ancestor.download.as_ref().expect("checked above");
                        let Download::SingleGet(single) = get;
                        http::check_plain_http("spec.parent.ancestors[].download.url", &single.url)
                            .map_err(|m| anyhow!(m))?;
                        println!("Layer {}/{} below the parent: {}", i + 1, layers, ancestor.snapshot_uri);
                        let what = format!("layer {} below the parent", i + 1);
                        let snapshot = self.fetch(
                            &what,
                            &ancestor.snapshot_uri,
                            ancestor.snapshot_sha256.as_deref(),
                            get,
                            &mut tree,
                        )?;
                        snapshot.merge_into(&mut index);
                    }
                }
                println!("Parent snapshot {} (FROM {reference})", parent.parent_manifest_uri);
                let snapshot = self.fetch(
                    "parent",
                    &parent.parent_manifest_uri,
                    parent.snapshot_sha256.as_deref(),
                    download,
                    &mut tree,
                )?;
                let config = snapshot.manifest.config.clone();
                snapshot.merge_into(&mut index);
                if is_final {
                    self.parent_index = Some(index);
                }
                config
            }
            Base::Image(reference) => {
                let located = format!("FROM {reference} (line {})", stage.from.line);
                self.local_image(reference, &mut tree).with_context(|| located)?
            }
            Base::Stage(position) => {
                let from = self.built.get(position).expect("an earlier stage is built first");
                let stats = tree.copy_tree(&from.tree).with_context(|| format!("start from stage {position}"))?;
                println!(" ---> stage {position}'s tree: {} files ({})", stats.files, human_bytes(stats.bytes));
                from.config.clone()
            }
        };
        let plan = plan(stage, base_config).context("spec.dockerfile")?;
        for note in &plan.notes {
            println!("note: {note}");
        }
        let total = plan.steps.len();
        for (index, step) in plan.steps.iter().enumerate() {
            println!("Step {}/{total} : {}", index + 1, step.text);
            let located = || format!("spec.dockerfile line {}: {}", step.line, step.text);
            match &step.action {
                Action::From => match &stage.base {
                    Base::Scratch => println!(" ---> empty tree"),
                    Base::Image(_) => println!(" ---> the snapshot's tree and config"),
                    Base::Stage(_) => println!(" ---> the stage's tree and config"),
                },
                Action::Copy(op) => {
                    let stats = self.copy(&mut tree, op).with_context(located)?;
                    for note in &stats.notes {
                        println!("note: {note}");
                    }
                    println!(
                        " ---> files: {} ({}), directories: {}, symlinks: {}",
                        stats.files,
                        human_bytes(stats.bytes),
                        stats.dirs,
                        stats.symlinks
                    );
                }
                Action::MakeDir(path) => {
                    tree.make_dirs(path).with_context(located)?;
                    println!(" ---> {path}");
                }
                Action::Run(op) => {
                    run_step(&mut tree, op)
                        .with_context(|| format!("step {}/{total} failed", index + 1))
                        .with_context(located)?;
                }
                Action::Config => {}
            }
        }
        self.built.insert(stage.position, StageTree { tree, config: plan.config });
        Ok(())
    }

    /// COPY/ADD from the context, an earlier stage or a template.
    fn copy(&mut self, tree: &mut Tree, op: &CopyOp) -> Result<CopyStats> {
        let origin = match &op.from {
            None => {
                if self.context.is_none() {
                    self.context = Some(open_context(self.spec, self.spec_path)?);
                }
                return tree.copy(self.context.as_ref().expect("set above"), op, None);
            }
            Some(CopyFrom::Stage(position)) => self.built.get(position).expect("an earlier stage is built first"),
            Some(CopyFrom::Image(reference)) => {
                if !self.images.contains_key(reference) {
                    let dir = self.work.join(format!("image-{}", self.images.len()));
                    let mut image = Tree::create(dir)?;
                    let config = self.local_image(reference, &mut image)?;
                    self.images.insert(reference.clone(), StageTree { tree: image, config });
                }
                &self.images[reference]
            }
        };
        // Sources are paths in that image, resolved as inside it (symlinks stay in it).
        let sources = op.sources.iter().map(|s| origin.tree.resolve_pattern(s)).collect::<Result<Vec<_>>>()?;
        let context = Context::open(origin.tree.root())?;
        tree.copy(&context, &CopyOp { sources, ..op.clone() }, Some(&origin.tree))
    }

    /// Downloads `reference` (an entry of spec.additionalLocalImages) into `tree`; returns its config.
    fn local_image(&self, reference: &str, tree: &mut Tree) -> Result<ImageConfig> {
        let image = self.spec.additional_local_images.iter().find(|i| i.reference == reference).ok_or_else(|| {
            anyhow!(
                "{reference} is not among spec.additionalLocalImages: it is neither an earlier stage nor a \
                     template the platform resolved (registry images are not supported by the reference builder yet)"
            )
        })?;
        let download = image.download.as_ref().ok_or_else(|| {
            anyhow!("spec.additionalLocalImages entry {reference} has no download; the client did not sign its read")
        })?;
        let Download::SingleGet(get) = download;
        http::check_plain_http("spec.additionalLocalImages[].download.url", &get.url).map_err(|m| anyhow!(m))?;
        println!("Image {reference}: snapshot {}", image.snapshot_uri);
        let snapshot = self.fetch(reference, &image.snapshot_uri, image.snapshot_sha256.as_deref(), download, tree)?;
        Ok(snapshot.manifest.config)
    }

    /// Downloads a snapshot, checks its sha256 and unpacks it into `tree`.
    fn fetch(
        &self,
        what: &str,
        uri: &str,
        sha256: Option<&str>,
        download: &Download,
        tree: &mut Tree,
    ) -> Result<ParentSnapshot> {
        let path = self.work.join("download.tar.zst");
        let (size, got) = download_parent(self.agent, download, &path)?;
        check_sha256(sha256, &got, size).map_err(|m| anyhow!(m))?;
        let snapshot = read_archive(&path, Some(tree))
            .with_context(|| format!("the {what} archive {uri} is not a valid {FORMAT_VERSION} snapshot"))?;
        fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        println!(
            "Snapshot {} ({} node): {} entries unpacked, sha256 verified: {}",
            snapshot.manifest.snapshot_id,
            snapshot.manifest.node_kind,
            snapshot.manifest.files,
            if sha256.is_some() { "yes" } else { "no (the spec gives no snapshotSha256)" }
        );
        Ok(snapshot)
    }
}

/// One RUN step: the USER resolved in the tree, owners moved onto the files,
/// the working directory made (as Docker does), then the command confined
/// ([`step`]). A command that fails fails the build, naming it and its code.
fn run_step(tree: &mut Tree, op: &RunOp) -> Result<()> {
    let who = tree.lookup_user(&op.user)?;
    tree.own_on_disk()?;
    tree.make_dirs(&op.workdir)?;
    let mut env = op.env.clone();
    let has = |env: &[String], key: &str| env.iter().any(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key);
    for (key, value) in [("PATH", DEFAULT_PATH), ("HOSTNAME", "buildkitsandbox"), ("HOME", who.home.as_str())] {
        if !has(&env, key) {
            env.push(format!("{key}={value}"));
        }
    }
    let root = fs::canonicalize(tree.root()).with_context(|| format!("resolve {}", tree.root().display()))?;
    let confined = Confined {
        root,
        argv: op.argv.clone(),
        env,
        workdir: op.workdir.clone(),
        uid: who.uid,
        gid: who.gid,
        groups: who.groups.clone(),
    };
    let started = Instant::now();
    let command = format!("\"{}\"", op.argv.join(" "));
    match step::run(&confined)? {
        Ended::Code(0) => {
            println!(" ---> ran in {:.2} s as {}:{}", started.elapsed().as_secs_f64(), who.uid, who.gid);
            Ok(())
        }
        Ended::Code(code) => bail!("the command {command} exited with code {code}"),
        Ended::Signal(signal) => bail!("the command {command} was killed by signal {signal}"),
    }
}

/// PATH for a RUN step when the image sets none (Docker's).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `contextDir`, relative to the spec file's directory when not absolute.
fn open_context(spec: &Spec, spec_path: &Path) -> Result<Context> {
    let context_dir = Path::new(&spec.context_dir);
    let dir = if context_dir.is_absolute() {
        context_dir.to_path_buf()
    } else {
        spec_path.parent().unwrap_or(Path::new(".")).join(context_dir)
    };
    Context::open(&dir).context("spec.contextDir")
}
