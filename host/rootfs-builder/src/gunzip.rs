//! `gzip -d` as the builder sandbox provides it: the dev stack puts a link
//! `gzip -> tl-rootfs-build` first in the sandbox's `PATH`, and the build
//! client's `tar -xzf` (wit/protocol.md §5.6; snapsign's host sends the
//! dev stack's sandboxes a plain tar unless told to gzip) then unpacks the context
//! through this decoder (zlib-rs, the CRC-32 on the CPU's carry-less
//! multiply) instead of GNU gzip's, which decodes about 200 MB/s. Only the
//! stream form tar uses is served here (`-d`, optionally with `-c`, `-f`,
//! `-q`, stdin to stdout); any other use execs the system's gzip with the
//! same arguments, so `gzip` behaves as the real one does.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

/// The name this decoder answers to (argv[0]'s file name).
pub const NAME: &str = "gzip";
/// Where the system's gzip is looked for when the use is not ours.
const SYSTEM_GZIP: [&str; 2] = ["/usr/bin/gzip", "/bin/gzip"];
const BUFFER: usize = 1 << 20;

/// Whether `args` (without argv[0]) ask only to decompress stdin to stdout.
pub fn is_stream_decompress(args: &[String]) -> bool {
    let mut decompress = false;
    for arg in args {
        match arg.as_str() {
            "--decompress" | "--uncompress" => decompress = true,
            "--stdout" | "--to-stdout" | "--force" | "--quiet" => {}
            short if short.len() > 1 && short.starts_with('-') && !short.starts_with("--") => {
                for flag in short[1..].chars() {
                    match flag {
                        'd' => decompress = true,
                        'c' | 'f' | 'q' => {}
                        _ => return false,
                    }
                }
            }
            // A file name, `-` or a long option we do not serve.
            _ => return false,
        }
    }
    decompress
}

/// Runs as `gzip`: decodes stdin to stdout, or hands over to the system's gzip.
pub fn main(args: Vec<String>) -> ExitCode {
    if !is_stream_decompress(&args) {
        let Some(system) = SYSTEM_GZIP.iter().find(|path| std::path::Path::new(path).exists()) else {
            eprintln!("gzip: only `gzip -d` (stdin to stdout) is built in here, and no system gzip was found");
            return ExitCode::from(1);
        };
        let error = std::process::Command::new(system).arg0(NAME).args(&args).exec();
        eprintln!("gzip: run {system}: {error}");
        return ExitCode::from(1);
    }
    // SAFETY: fds 0 and 1 are open for the whole process; ManuallyDrop
    // keeps them open after use. std's own handles would buffer stdin in
    // 8 KiB reads and flush stdout at every newline.
    let (stdin, stdout) = unsafe { (ManuallyDrop::new(File::from_raw_fd(0)), ManuallyDrop::new(File::from_raw_fd(1))) };
    match decode(&*stdin, &*stdout) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gzip: stdin: {e}");
            ExitCode::from(1)
        }
    }
}

/// Decodes every gzip member of `input` into `output`; returns the bytes written.
pub fn decode(input: impl Read, mut output: impl Write) -> io::Result<u64> {
    let mut decoder = flate2::read::MultiGzDecoder::new(BufReader::with_capacity(BUFFER, input));
    let mut buffer = vec![0u8; BUFFER];
    let mut total = 0u64;
    loop {
        let n = match decoder.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        output.write_all(&buffer[..n])?;
        total += n as u64;
    }
    output.flush()?;
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn only_the_stream_decompression_tar_runs_is_served() {
        for served in
            [&["-d"][..], &["-dc"], &["-cd"], &["-d", "-c"], &["--decompress"], &["-dfq"], &["-d", "--stdout"]]
        {
            assert!(is_stream_decompress(&args(served)), "{served:?}");
        }
        for system in [&[][..], &["-c"], &["-1"], &["-d", "file.gz"], &["-d", "-"], &["-dk"], &["--list"], &["-t"]] {
            assert!(!is_stream_decompress(&args(system)), "{system:?}");
        }
    }

    #[test]
    fn concatenated_members_decode_and_corruption_is_an_error() {
        let gz = |data: &[u8]| {
            let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            encoder.write_all(data).unwrap();
            encoder.finish().unwrap()
        };
        let mut stream = gz(b"first ");
        stream.extend(gz(b"second"));
        let mut out = Vec::new();
        assert_eq!(decode(&stream[..], &mut out).unwrap(), 12);
        assert_eq!(out, b"first second");
        let mut broken = gz(&vec![7u8; 100_000]);
        let at = broken.len() - 6;
        broken[at] ^= 0xff; // the CRC
        let error = decode(&broken[..], &mut Vec::new()).unwrap_err();
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput, "{error}");
    }
}
