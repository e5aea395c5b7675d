//! A gzip writer that compresses on every core: one gzip member whose
//! deflate stream is the blocks of [`ParallelBlocks`] with the [`Gzip`]
//! codec (each block raw deflate ending with a sync flush, `00 00 ff ff`,
//! so the next starts on a byte boundary; or stored deflate blocks when it
//! looks random), then an empty final block and the CRC-32 of all the
//! bytes, combined from the blocks' own. `gzip -d` and `tar -xzf` read it
//! as any gzip file.

use std::io::{self, Write};

use snapsign_rootfs_builder::blocks::{Gzip, ParallelBlocks, default_workers};

/// The gzip header: deflate, no name, mtime 0, OS unknown (deterministic).
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
/// An empty final block (fixed Huffman, end-of-block only).
const FINAL_BLOCK: [u8; 2] = [0x03, 0x00];

/// What went into the stream, for the caller's figures.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GzipStats {
    /// Input bytes.
    pub bytes_in: u64,
    /// Output bytes (header and trailer included).
    pub bytes_out: u64,
    /// Input bytes sent as stored blocks.
    pub stored: u64,
    /// Input bytes deflated.
    pub deflated: u64,
}

/// A gzip encoder over `inner` that deflates blocks on every core.
pub struct ParallelGzip<W: Write> {
    blocks: ParallelBlocks<W, Gzip>,
}

impl<W: Write> ParallelGzip<W> {
    /// An encoder with one worker per core.
    pub fn new(inner: W) -> io::Result<Self> {
        Self::with_workers(inner, default_workers())
    }

    /// An encoder with `workers` compressing threads.
    pub fn with_workers(inner: W, workers: usize) -> io::Result<Self> {
        let mut blocks = ParallelBlocks::new(inner, Gzip::fast(), workers)?;
        blocks.get_mut().write_all(&HEADER)?;
        Ok(ParallelGzip { blocks })
    }

    /// Ends the stream (final block, CRC-32, length) and returns the inner writer and the figures.
    pub fn finish(self) -> io::Result<(W, GzipStats)> {
        let (mut inner, stats) = self.blocks.finish()?;
        let mut trailer = Vec::with_capacity(10);
        trailer.extend_from_slice(&FINAL_BLOCK);
        trailer.extend_from_slice(&stats.crc32.to_le_bytes());
        // ISIZE is the length modulo 2^32 (RFC 1952).
        trailer.extend_from_slice(&(stats.bytes_in as u32).to_le_bytes());
        inner.write_all(&trailer)?;
        inner.flush()?;
        Ok((
            inner,
            GzipStats {
                bytes_in: stats.bytes_in,
                bytes_out: (HEADER.len() + trailer.len()) as u64 + stats.bytes_out,
                stored: stats.stored,
                deflated: stats.compressed,
            },
        ))
    }
}

impl<W: Write> Write for ParallelGzip<W> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.blocks.write(data)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use snapsign_rootfs_builder::blocks::BLOCK;
    use snapsign_rootfs_builder::sample::{random, text};

    use super::*;

    fn gzip(data: &[u8], workers: usize, writes: usize) -> (Vec<u8>, GzipStats) {
        let mut encoder = ParallelGzip::with_workers(Vec::new(), workers).unwrap();
        for piece in data.chunks(writes.max(1)) {
            encoder.write_all(piece).unwrap();
        }
        encoder.finish().unwrap()
    }

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(gz).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn random_blocks_are_stored_and_text_is_deflated_and_both_come_back() {
        let mut data = random(3 * BLOCK, 1);
        data.extend(text(3 * BLOCK + 12_345));
        let (gz, stats) = gzip(&data, 3, 8192);
        assert!(gunzip(&gz) == data);
        assert_eq!(stats.bytes_in, data.len() as u64);
        assert_eq!(stats.bytes_out, gz.len() as u64);
        assert_eq!(stats.stored, 3 * BLOCK as u64, "{stats:?}");
        assert_eq!(stats.deflated, (3 * BLOCK + 12_345) as u64, "{stats:?}");
        // The text shrinks; the random part grows by no more than the stored headers.
        assert!(gz.len() < data.len() / 2 + 3 * BLOCK, "{} of {}", gz.len(), data.len());
    }

    #[test]
    fn empty_and_tiny_inputs_are_valid_gzip() {
        for data in [Vec::new(), b"x".to_vec(), text(100)] {
            let (gz, _) = gzip(&data, 2, 10);
            assert_eq!(gunzip(&gz), data);
        }
    }

    #[test]
    fn the_trailer_holds_the_crc_and_the_length() {
        let mut data = text(BLOCK + 5000);
        data.extend(random(BLOCK, 2));
        let (gz, _) = gzip(&data, 2, 100);
        let isize = u32::from_le_bytes(gz[gz.len() - 4..].try_into().unwrap());
        assert_eq!(isize, data.len() as u32);
        let crc = u32::from_le_bytes(gz[gz.len() - 8..gz.len() - 4].try_into().unwrap());
        assert_eq!(crc, crc32fast::hash(&data));
    }
}
