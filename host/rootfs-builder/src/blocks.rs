//! Compressing a stream on every core, block by block, with incompressible
//! blocks stored as they are. The stream is cut into [`BLOCK`]-byte blocks;
//! worker threads encode each one on its own (no dictionary carried across
//! blocks, as pigz and pzstd do) and the results are written in order, so
//! the output is the same whatever the number of workers. A block whose
//! bytes look random (sampled byte entropy of 7.5 bits or more: media,
//! archives, already-compressed data) is stored: a copy, not a compression
//! attempt that would fail anyway.
//!
//! Two codecs: [`Gzip`] (one gzip member: byte-aligned deflate pieces, see
//! `ParallelGzip` in the host's `pack`) and [`Zstd`] (one zstd frame per
//! block, raw-block frames for stored ones; concatenated frames are one
//! zstd stream, RFC 8878 §3.1).

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Bytes per block.
pub const BLOCK: usize = 1 << 20;
/// Sampled byte entropy (bits per byte) at or above which a block is stored.
const STORE_ABOVE_BITS: f64 = 7.5;

/// One block, encoded.
pub struct Encoded {
    /// The encoded bytes.
    pub bytes: Vec<u8>,
    /// Stored rather than compressed.
    pub stored: bool,
}

/// How blocks are encoded; each worker has its own clone.
pub trait Codec: Clone + Send + 'static {
    /// Encodes `block` on its own; `random` says it looks incompressible.
    fn encode(&mut self, block: &[u8], random: bool) -> io::Result<Encoded>;
}

/// What went through, for the caller's figures (and gzip's trailer).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockStats {
    /// Input bytes.
    pub bytes_in: u64,
    /// Encoded bytes written (blocks only).
    pub bytes_out: u64,
    /// Input bytes stored.
    pub stored: u64,
    /// Input bytes compressed.
    pub compressed: u64,
    /// CRC-32 of the input.
    pub crc32: u32,
}

struct Done {
    seq: u64,
    encoded: Encoded,
    crc: u32,
    len: u64,
}

type Work = Arc<Mutex<Receiver<(u64, Vec<u8>)>>>;

/// A writer that encodes what it is given with `C` on `workers` threads and
/// writes the blocks, in order, to `W`.
pub struct ParallelBlocks<W: Write, C: Codec> {
    inner: Option<W>,
    block: Vec<u8>,
    next_seq: u64,
    next_write: u64,
    in_flight: usize,
    max_in_flight: usize,
    work: Option<SyncSender<(u64, Vec<u8>)>>,
    done: Receiver<io::Result<Done>>,
    waiting: BTreeMap<u64, Done>,
    workers: Vec<JoinHandle<()>>,
    crc: crc32fast::Hasher,
    stats: BlockStats,
    _codec: std::marker::PhantomData<C>,
}

/// One worker per core, at least one.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl<W: Write, C: Codec> ParallelBlocks<W, C> {
    /// At most twice `workers` blocks (plus the one being filled) are held at once.
    pub fn new(inner: W, codec: C, workers: usize) -> io::Result<Self> {
        let workers = workers.max(1);
        let (work_tx, work_rx) = sync_channel::<(u64, Vec<u8>)>(workers);
        let (done_tx, done_rx) = sync_channel::<io::Result<Done>>(workers * 2);
        let work: Work = Arc::new(Mutex::new(work_rx));
        let handles = (0..workers)
            .map(|i| {
                let (work, done, codec) = (work.clone(), done_tx.clone(), codec.clone());
                std::thread::Builder::new()
                    .name(format!("blocks-{i}"))
                    .spawn(move || worker(codec, &work, &done))
                    .map_err(|e| io::Error::other(format!("start a compression thread: {e}")))
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(ParallelBlocks {
            inner: Some(inner),
            block: Vec::with_capacity(BLOCK),
            next_seq: 0,
            next_write: 0,
            in_flight: 0,
            max_in_flight: workers * 2,
            work: Some(work_tx),
            done: done_rx,
            waiting: BTreeMap::new(),
            workers: handles,
            crc: crc32fast::Hasher::new(),
            stats: BlockStats::default(),
            _codec: std::marker::PhantomData,
        })
    }

    /// The inner writer (to write a header before any block).
    pub fn get_mut(&mut self) -> &mut W {
        self.inner.as_mut().expect("present until finish")
    }

    /// Writes the last blocks and returns the inner writer and the figures.
    pub fn finish(mut self) -> io::Result<(W, BlockStats)> {
        self.send_block()?;
        while self.in_flight > 0 {
            self.receive_one()?;
        }
        self.work.take();
        let inner = self.inner.take().expect("present until finish");
        self.stats.crc32 = self.crc.clone().finalize();
        Ok((inner, self.stats))
    }

    fn send_block(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        while self.in_flight >= self.max_in_flight {
            self.receive_one()?;
        }
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(BLOCK));
        let work = self.work.as_ref().expect("present until finish");
        work.send((self.next_seq, block)).map_err(|_| io::Error::other("the compression threads stopped"))?;
        self.next_seq += 1;
        self.in_flight += 1;
        Ok(())
    }

    /// Waits for one encoded block and writes every block now in order.
    fn receive_one(&mut self) -> io::Result<()> {
        let done = self.done.recv().map_err(|_| io::Error::other("the compression threads stopped"))??;
        self.in_flight -= 1;
        self.waiting.insert(done.seq, done);
        while let Some(done) = self.waiting.remove(&self.next_write) {
            let inner = self.inner.as_mut().expect("present until finish");
            inner.write_all(&done.encoded.bytes)?;
            self.crc.combine(&crc32fast::Hasher::new_with_initial_len(done.crc, done.len));
            self.stats.bytes_in += done.len;
            self.stats.bytes_out += done.encoded.bytes.len() as u64;
            if done.encoded.stored {
                self.stats.stored += done.len;
            } else {
                self.stats.compressed += done.len;
            }
            self.next_write += 1;
        }
        Ok(())
    }
}

impl<W: Write, C: Codec> Write for ParallelBlocks<W, C> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let take = (BLOCK - self.block.len()).min(data.len());
        self.block.extend_from_slice(&data[..take]);
        if self.block.len() == BLOCK {
            self.send_block()?;
        }
        Ok(take)
    }

    /// Blocks are cut at [`BLOCK`] bytes whatever the flushes; `finish` ends the stream.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<W: Write, C: Codec> Drop for ParallelBlocks<W, C> {
    fn drop(&mut self) {
        // Unfinished (an error upstream): stop the workers, drop what they hold.
        self.work.take();
        for handle in self.workers.drain(..) {
            // A worker blocked on a full `done` channel is freed by draining it.
            while !handle.is_finished() {
                while self.done.try_recv().is_ok() {}
                std::thread::yield_now();
            }
            let _ = handle.join();
        }
    }
}

fn worker<C: Codec>(mut codec: C, work: &Work, done: &SyncSender<io::Result<Done>>) {
    loop {
        let next = work.lock().map_or(None, |rx| rx.recv().ok());
        let Some((seq, block)) = next else { return };
        let result = codec.encode(&block, looks_random(&block)).map(|encoded| Done {
            seq,
            encoded,
            crc: crc32fast::hash(&block),
            len: block.len() as u64,
        });
        if done.send(result).is_err() {
            return;
        }
    }
}

/// Whether `block`'s bytes look incompressible: the byte entropy of four
/// 4 KiB samples spread over it is at or above [`STORE_ABOVE_BITS`].
/// Random and already-compressed data measure about 7.95 (8 less the
/// estimate's bias on 16 KiB), text about 4 to 5, machine code about 6.
pub fn looks_random(block: &[u8]) -> bool {
    const SAMPLE: usize = 4096;
    if block.len() < 4 * SAMPLE {
        return false;
    }
    let mut counts = [0u32; 256];
    let step = (block.len() - SAMPLE) / 3;
    for i in 0..4 {
        for &byte in &block[i * step..i * step + SAMPLE] {
            counts[byte as usize] += 1;
        }
    }
    let total = (4 * SAMPLE) as f64;
    let entropy: f64 = counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / total;
            -p * p.log2()
        })
        .sum();
    entropy >= STORE_ABOVE_BITS
}

/// Deflate pieces of one gzip member: each block is raw deflate ending on a
/// byte boundary (a sync flush), or stored deflate blocks.
pub struct Gzip {
    level: u32,
    deflate: Option<flate2::Compress>,
}

impl Clone for Gzip {
    fn clone(&self) -> Gzip {
        Gzip { level: self.level, deflate: None }
    }
}

impl Gzip {
    /// The fastest level.
    pub fn fast() -> Gzip {
        Gzip { level: 1, deflate: None }
    }
}

/// Largest stored deflate block.
const STORED_MAX: usize = 65_535;

impl Codec for Gzip {
    fn encode(&mut self, block: &[u8], random: bool) -> io::Result<Encoded> {
        use flate2::{Compress, Compression, FlushCompress, Status};
        if random {
            return Ok(Encoded { bytes: deflate_stored(block), stored: true });
        }
        let level = self.level;
        let deflate = self.deflate.get_or_insert_with(|| Compress::new(Compression::new(level), false));
        deflate.reset();
        // Deflate's worst case is a few bytes per 16 KiB over the input: one call does it.
        let mut out = Vec::with_capacity(block.len() + block.len() / 64 + 1024);
        loop {
            let consumed = deflate.total_in() as usize;
            if out.capacity() - out.len() < 1024 {
                out.reserve(out.capacity());
            }
            let status = deflate
                .compress_vec(&block[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| io::Error::other(format!("deflate: {e}")))?;
            // Done once all input went in and the flush ended with room to spare
            // (a flush with nothing left to write answers BufError).
            let all_in = deflate.total_in() as usize == block.len();
            if all_in && (out.capacity() > out.len() || status == Status::BufError) {
                break;
            }
        }
        if out.len() > block.len() + block.len().div_ceil(STORED_MAX) * 5 {
            // Compression made it larger: store it after all.
            return Ok(Encoded { bytes: deflate_stored(block), stored: true });
        }
        Ok(Encoded { bytes: out, stored: false })
    }
}

/// `data` as stored deflate blocks (non-final), each at most 65,535 bytes.
fn deflate_stored(data: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() + data.len().div_ceil(STORED_MAX) * 5);
    for chunk in data.chunks(STORED_MAX) {
        let len = chunk.len() as u16;
        out.push(0);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(chunk);
    }
    out
}

/// One zstd frame per block: compressed at `level`, or made of raw blocks.
pub struct Zstd {
    level: i32,
    compressor: Option<zstd::bulk::Compressor<'static>>,
}

impl Clone for Zstd {
    fn clone(&self) -> Zstd {
        Zstd { level: self.level, compressor: None }
    }
}

impl Zstd {
    /// Frames compressed at `level`.
    pub fn level(level: i32) -> Zstd {
        Zstd { level, compressor: None }
    }
}

/// zstd's largest block (and the raw frames' window).
const ZSTD_BLOCK_MAX: usize = 128 << 10;

impl Codec for Zstd {
    fn encode(&mut self, block: &[u8], random: bool) -> io::Result<Encoded> {
        if random {
            return Ok(Encoded { bytes: zstd_raw_frame(block), stored: true });
        }
        let compressor = match &mut self.compressor {
            Some(compressor) => compressor,
            none => none.insert(zstd::bulk::Compressor::new(self.level)?),
        };
        let bytes = compressor.compress(block)?;
        Ok(Encoded { bytes, stored: false })
    }
}

/// `data` as one zstd frame of raw blocks (RFC 8878 §3.1.1): no content
/// size, no checksum, a 128 KiB window, blocks of at most 128 KiB.
fn zstd_raw_frame(data: &[u8]) -> Vec<u8> {
    const MAGIC: [u8; 4] = [0x28, 0xb5, 0x2f, 0xfd];
    // Frame header descriptor 0: no content size, windowed, no checksum, no dictionary.
    // Window descriptor: exponent 7 (windowLog 17 = 128 KiB), mantissa 0.
    const HEADER: [u8; 2] = [0x00, 7 << 3];
    let mut out = Vec::with_capacity(data.len() + 6 + data.len().div_ceil(ZSTD_BLOCK_MAX) * 3 + 3);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&HEADER);
    let count = data.len().div_ceil(ZSTD_BLOCK_MAX).max(1);
    for (i, chunk) in data.chunks(ZSTD_BLOCK_MAX).chain(data.is_empty().then_some(&data[..0])).enumerate() {
        let last = u32::from(i + 1 == count);
        // Block header: Last_Block (bit 0), Block_Type 0 = raw (bits 1-2), Block_Size (bits 3-23).
        let header = last | ((chunk.len() as u32) << 3);
        out.extend_from_slice(&header.to_le_bytes()[..3]);
        out.extend_from_slice(chunk);
    }
    out
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;
    use crate::sample::{random, text};

    fn encode<C: Codec>(codec: C, data: &[u8], workers: usize, writes: usize) -> (Vec<u8>, BlockStats) {
        let mut encoder = ParallelBlocks::new(Vec::new(), codec, workers).unwrap();
        for piece in data.chunks(writes.max(1)) {
            encoder.write_all(piece).unwrap();
        }
        encoder.finish().unwrap()
    }

    fn unzstd(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        zstd::stream::read::Decoder::new(bytes).unwrap().read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn zstd_frames_of_random_and_text_blocks_decode_as_one_stream() {
        let mut data = random(3 * BLOCK + 5, 1);
        data.extend(text(2 * BLOCK + 12_345));
        let (zst, stats) = encode(Zstd::level(3), &data, 3, 8192);
        assert!(unzstd(&zst) == data);
        assert_eq!((stats.stored, stats.compressed), ((3 * BLOCK) as u64, (2 * BLOCK + 12_350) as u64), "{stats:?}");
        assert_eq!(stats.crc32, crc32fast::hash(&data));
        assert!(zst.len() < data.len() - BLOCK, "{} of {}", zst.len(), data.len());
    }

    #[test]
    fn the_output_is_the_same_whatever_the_workers_and_write_sizes() {
        let mut data = text(2 * BLOCK + 7);
        data.extend(random(BLOCK + 3, 9));
        for codec in [0, 1] {
            let run = |workers, writes| match codec {
                0 => encode(Zstd::level(3), &data, workers, writes).0,
                _ => encode(Gzip::fast(), &data, workers, writes).0,
            };
            assert_eq!(run(1, 1 << 20), run(4, 777));
        }
    }

    #[test]
    fn raw_zstd_frames_of_any_length_decode() {
        for len in [0, 1, ZSTD_BLOCK_MAX - 1, ZSTD_BLOCK_MAX, ZSTD_BLOCK_MAX + 1, 3 * ZSTD_BLOCK_MAX] {
            let data = random(len, len as u64);
            assert!(unzstd(&zstd_raw_frame(&data)) == data, "{len} bytes");
        }
    }

    #[test]
    fn entropy_tells_random_from_text_and_zeros() {
        assert!(looks_random(&random(BLOCK, 5)));
        assert!(!looks_random(&text(BLOCK)));
        assert!(!looks_random(&vec![0u8; BLOCK]));
        // Half random, half zeros: compressible, so compressed.
        let mut half = random(BLOCK / 2, 3);
        half.extend(vec![0u8; BLOCK / 2]);
        assert!(!looks_random(&half));
    }

    #[test]
    fn a_failing_writer_fails_the_encoder_and_stops_its_workers() {
        /// Takes `room` bytes, then fails.
        struct Full {
            room: usize,
        }
        impl Write for Full {
            fn write(&mut self, data: &[u8]) -> io::Result<usize> {
                if data.len() > self.room {
                    return Err(io::Error::other("disk full"));
                }
                self.room -= data.len();
                Ok(data.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        // Fails mid-stream, with blocks still in the workers; dropping it must not hang.
        let mut encoder = ParallelBlocks::new(Full { room: BLOCK }, Zstd::level(3), 2).unwrap();
        let data = random(16 * BLOCK, 4);
        let failed = data.chunks(64 << 10).map(|piece| encoder.write_all(piece)).find(Result::is_err);
        let error = match failed {
            Some(error) => error.unwrap_err(),
            None => encoder.finish().map(drop).unwrap_err(),
        };
        assert_eq!(error.to_string(), "disk full");
    }
}
