//! Deterministic sample data for tests and benchmarks: bytes that do not
//! compress (as media and compressed files) and text that does.

/// `len` bytes from a xorshift generator seeded with `seed`: incompressible.
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 24) as u8
        })
        .collect()
}

/// `len` bytes of words and newlines: compresses about 4:1.
pub fn text(len: usize) -> Vec<u8> {
    let words = ["sandbox ", "image ", "snapshot ", "upload ", "tenant ", "signer\n", "build ", "layer "];
    let mut out = Vec::with_capacity(len + 16);
    let mut i = 7usize;
    while out.len() < len {
        i = i.wrapping_mul(2_654_435_761).wrapping_add(1);
        out.extend_from_slice(words[(i >> 7) % words.len()].as_bytes());
    }
    out.truncate(len);
    out
}
