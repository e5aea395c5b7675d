//! `upload-directory`'s mechanics: the packer ([`crate::pack`]) runs on a
//! blocking thread (its gzip workers on the others) and hands each block
//! (compressed, or 1 MiB of plain tar) to this task, which streams it into the backend's file
//! as it comes, so packing and sending overlap and at most a few blocks are
//! held at once, whatever the directory's size.

use std::io::{self, Write};
use std::path::PathBuf;

use super::backend::{FileSink, SandboxError};
use super::ctx::ProgressFn;

/// Blocks in flight between the packer and the sandbox.
const QUEUE: usize = 4;

/// Why an upload failed: packing (the directory) or sending (the sandbox).
pub(super) enum Failed {
    Pack(io::Error),
    Sandbox(SandboxError),
}

/// Packs `dir` (leaving out `exclude`) into `sink`; returns the bytes written.
pub(super) async fn directory(
    dir: PathBuf,
    exclude: crate::pack::Patterns,
    encoding: crate::pack::Encoding,
    mut sink: FileSink,
    progress: Option<ProgressFn>,
) -> Result<u64, Failed> {
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(QUEUE);
    let packer = tokio::task::spawn_blocking(move || {
        crate::pack::pack_context(&dir, &exclude, encoding, Channel { tx }).map(|(_, packed)| (dir, packed))
    });
    let (mut sent, mut refused) = (0u64, None);
    while let Some(chunk) = rx.recv().await {
        let len = chunk.len() as u64;
        if let Err(e) = sink.write(chunk).await {
            refused = Some(e);
            break;
        }
        sent += len;
        if let Some(progress) = &progress {
            progress(sent, 0);
        }
    }
    // A refused sandbox stops the packer at its next block.
    drop(rx);
    let packed = packer.await.map_err(|e| Failed::Pack(io::Error::other(format!("the packing thread: {e}"))))?;
    if let Some(e) = refused {
        return Err(Failed::Sandbox(e));
    }
    let (dir, packed) = packed.map_err(Failed::Pack)?;
    if !packed.skipped.is_empty() {
        tracing::warn!(
            dir = %dir.display(), left_out = ?packed.skipped,
            "sockets, fifos and devices in the directory were not sent"
        );
    }
    let written = sink.finish().await.map_err(Failed::Sandbox)?;
    if let Some(progress) = &progress {
        progress(written, written);
    }
    tracing::debug!(
        dir = %dir.display(), ?encoding, files = packed.files, bytes_in = packed.gzip.bytes_in,
        stored = packed.gzip.stored, deflated = packed.gzip.deflated, written,
        "directory packed and sent"
    );
    Ok(written)
}

/// The packer's output, handed to the sending task.
struct Channel {
    tx: tokio::sync::mpsc::Sender<Vec<u8>>,
}

impl Write for Channel {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.tx
            .blocking_send(data.to_vec())
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the sandbox stopped taking the upload"))?;
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
