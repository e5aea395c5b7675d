//! The guest's stderr: its log lines, kept per request. One sink lives as
//! long as its instance; the host drains it after every request, so a reused
//! instance never mixes two requests' lines, and a guest that writes too much
//! loses the excess instead of trapping.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};

/// A bounded, drainable buffer behind the guest's stderr.
#[derive(Clone)]
pub(crate) struct GuestLog {
    capacity: usize,
    buffer: Arc<Mutex<BytesMut>>,
}

impl GuestLog {
    pub(crate) fn new(capacity: usize) -> Self {
        GuestLog { capacity, buffer: Arc::default() }
    }

    /// What the guest wrote since the last call; the sink is empty after it.
    pub(crate) fn take(&self) -> Bytes {
        std::mem::take(&mut *self.lock()).freeze()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BytesMut> {
        // A panic while holding the lock leaves bytes, never a broken invariant.
        self.buffer.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Keeps what fits under the capacity; the rest is dropped.
    fn append(&self, bytes: &[u8]) {
        let mut buffer = self.lock();
        let room = self.capacity.saturating_sub(buffer.len());
        buffer.extend_from_slice(&bytes[..bytes.len().min(room)]);
    }
}

impl IsTerminal for GuestLog {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for GuestLog {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }

    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl OutputStream for GuestLog {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.append(&bytes);
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        // Always writable: what does not fit is dropped, never an error the guest must handle.
        Ok(self.capacity.max(1))
    }
}

#[async_trait::async_trait]
impl Pollable for GuestLog {
    async fn ready(&mut self) {}
}

impl AsyncWrite for GuestLog {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.append(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_drains_and_the_capacity_drops_the_excess() {
        let log = GuestLog::new(8);
        let mut stream = log.p2_stream();
        stream.write(Bytes::from_static(b"request a: one\n")).unwrap();
        assert_eq!(&log.take()[..], b"request ", "kept up to the capacity");
        assert!(log.take().is_empty(), "drained");
        stream.write(Bytes::from_static(b"two")).unwrap();
        assert_eq!(&log.take()[..], b"two", "a drained sink takes new lines again");
    }
}
