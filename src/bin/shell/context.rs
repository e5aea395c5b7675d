//! Uploading the build context (wit/protocol.md §5.5): the preopened
//! `/context` as a deterministic gzip tar, streamed into the sandbox in
//! chunks through `sandbox-exec`, with progress events.

use std::io::Write;

use crate::bindings::snapsign::components::events::{Event, emit};
use crate::bindings::snapsign::components::sandbox_exec as sx;

/// Uploads the gzip tar of the context in chunks of this size.
const CHUNK: usize = 256 * 1024;
/// The build context, preopened read-only by the host.
const CONTEXT_DIR: &str = "/context";

/// Streams chunks to the sandbox file, reporting progress.
struct Upload {
    writer: sx::FileWriter,
    buffer: Vec<u8>,
    sent: u64,
}

impl Write for Upload {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.writer.write(&self.buffer).map_err(|e| std::io::Error::other(crate::error(e).to_string()))?;
        self.sent += self.buffer.len() as u64;
        emit(&Event::UploadProgress((self.sent, 0)));
        self.buffer.clear();
        Ok(())
    }
}

/// Archives the context into `path` in sandbox `id`; the error is worded for the build's failure.
pub fn upload(id: &str, path: &str) -> Result<(), String> {
    let writer = sx::open_file_writer(id, path).map_err(|e| format!("upload the context: {}", crate::error(e)))?;
    let upload = Upload { writer, buffer: Vec::with_capacity(CHUNK), sent: 0 };
    let gz = flate2::write::GzEncoder::new(upload, flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    append_tree(&mut tar, std::path::Path::new(CONTEXT_DIR), "")
        .map_err(|e| format!("archive the build context: {e}"))?;
    let mut upload =
        tar.into_inner().and_then(|gz| gz.finish()).map_err(|e| format!("archive the build context: {e}"))?;
    upload.flush().map_err(|e| format!("upload the context: {e}"))?;
    let written = upload.writer.finish().map_err(|e| format!("upload the context: {}", crate::error(e)))?;
    emit(&Event::UploadProgress((written, written)));
    Ok(())
}

/// Appends `dir` under `prefix`, sorted, with deterministic headers. WASI
/// has no permission bits, so files get 0644 and directories 0755.
fn append_tree<W: Write>(tar: &mut tar::Builder<W>, dir: &std::path::Path, prefix: &str) -> std::io::Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        let kind = entry.file_type()?;
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        if kind.is_dir() {
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            tar.append_data(&mut header, format!("{path}/"), std::io::empty())?;
            append_tree(tar, &entry.path(), &path)?;
        } else if kind.is_symlink() {
            let target = std::fs::read_link(entry.path())?;
            header.set_entry_type(tar::EntryType::Symlink);
            header.set_mode(0o777);
            header.set_size(0);
            tar.append_link(&mut header, &path, target)?;
        } else {
            let file = std::fs::File::open(entry.path())?;
            header.set_entry_type(tar::EntryType::Regular);
            header.set_mode(0o644);
            header.set_size(file.metadata()?.len());
            tar.append_data(&mut header, &path, file)?;
        }
    }
    Ok(())
}
