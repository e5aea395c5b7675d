//! The decisions of an S3 multipart upload (UploadPart ranges,
//! CompleteMultipartUpload body, reading its answer). No I/O.

use std::fmt;

use snapsign::wire::PartUrl;

/// One UploadPart: bytes `offset..offset+len` of the archive go to `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartRange {
    pub number: u32,
    pub offset: u64,
    pub len: u64,
    pub url: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MultipartError {
    ZeroPartSize,
    /// The archive needs more parts than were signed.
    TooManyParts {
        size: u64,
        part_size: u64,
        needed: u64,
        available: usize,
        max_parts: Option<u32>,
    },
    /// `partUrls` has no URL for a part the archive needs.
    MissingPartUrl {
        number: u32,
    },
    /// CompleteMultipartUpload answered non-2xx.
    CompleteStatus {
        status: u16,
        excerpt: String,
    },
    /// CompleteMultipartUpload answered 2xx with an `<Error>` document (S3 does that).
    CompleteErrorDocument {
        status: u16,
        excerpt: String,
    },
}

impl fmt::Display for MultipartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ZeroPartSize => write!(f, "spec.upload.partSizeBytes is 0"),
            Self::TooManyParts { size, part_size, needed, available, max_parts } => {
                write!(
                    f,
                    "the archive is {size} bytes and needs {needed} parts of {part_size} bytes, \
                     but spec.upload has only {available} part URLs"
                )?;
                if let Some(max) = max_parts {
                    write!(f, " (maxParts {max})")?;
                }
                write!(f, "; sign the upload for a larger rootfs (more parts)")
            }
            Self::MissingPartUrl { number } => write!(f, "spec.upload.partUrls has no URL for partNumber {number}"),
            Self::CompleteStatus { status, excerpt } => {
                write!(f, "CompleteMultipartUpload answered HTTP {status}: {excerpt}")
            }
            Self::CompleteErrorDocument { status, excerpt } => {
                write!(f, "CompleteMultipartUpload answered HTTP {status} with an error document: {excerpt}")
            }
        }
    }
}

impl std::error::Error for MultipartError {}

/// Part `number`'s length once the archive is `total` bytes: parts are
/// exactly `part_size` but the last; `None` past the end. An empty archive
/// is still one (empty) part.
pub fn part_len(number: u32, part_size: u64, total: u64) -> Option<u64> {
    let offset = u64::from(number.max(1) - 1) * part_size;
    (offset < total || number == 1).then(|| part_size.min(total - offset))
}

/// The signed URL of part `number`, matched by number, not position.
pub fn part_url(part_urls: &[PartUrl], number: u32) -> Result<&str, MultipartError> {
    part_urls
        .iter()
        .find(|p| p.part_number == number)
        .map(|p| p.url.as_str())
        .ok_or(MultipartError::MissingPartUrl { number })
}

/// Whether `size` bytes still fit the signed part URLs.
pub fn check_fits(
    size: u64,
    part_size: u64,
    max_parts: Option<u32>,
    part_urls: &[PartUrl],
) -> Result<(), MultipartError> {
    if part_size == 0 {
        return Err(MultipartError::ZeroPartSize);
    }
    let needed = size.div_ceil(part_size).max(1);
    if needed > part_urls.len() as u64 {
        return Err(MultipartError::TooManyParts { size, part_size, needed, available: part_urls.len(), max_parts });
    }
    Ok(())
}

/// The CompleteMultipartUpload body: parts in ascending order, each ETag
/// exactly as the store returned it (quotes included), XML-escaped.
pub fn complete_body(parts: &[(u32, String)]) -> String {
    let mut sorted: Vec<&(u32, String)> = parts.iter().collect();
    sorted.sort_by_key(|(number, _)| *number);
    let mut xml = String::from("<CompleteMultipartUpload>");
    for (number, etag) in sorted {
        xml.push_str(&format!("<Part><PartNumber>{number}</PartNumber><ETag>{}</ETag></Part>", xml_escape(etag)));
    }
    xml.push_str("</CompleteMultipartUpload>");
    xml
}

pub fn xml_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c => out.push(c),
        }
    }
    out
}

/// Success is a 2xx whose body is not an `<Error>` document.
pub fn check_complete(status: u16, body: &str) -> Result<(), MultipartError> {
    let excerpt = excerpt(body);
    if !(200..300).contains(&status) {
        return Err(MultipartError::CompleteStatus { status, excerpt });
    }
    if body.contains("<Error>") {
        return Err(MultipartError::CompleteErrorDocument { status, excerpt });
    }
    Ok(())
}

/// The start of a response body on one line, for error messages (the core's one rule).
pub use snapsign::wire::excerpt;

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(n: u32) -> Vec<PartUrl> {
        (1..=n).map(|i| PartUrl { part_number: i, url: format!("http://s/{i}") }).collect()
    }

    #[test]
    fn parts_are_exact_size_but_the_last() {
        let shape: Vec<Option<u64>> = (1..=4).map(|n| part_len(n, 5, 12)).collect();
        assert_eq!(shape, [Some(5), Some(5), Some(2), None]);
        assert_eq!(part_len(3, 5, 10), None);
        assert_eq!(part_len(1, 5, 0), Some(0), "an empty archive is one empty part");
        assert_eq!(part_len(2, 5, 0), None);
    }

    #[test]
    fn part_urls_are_matched_by_number_not_position() {
        let mut shuffled = urls(2);
        shuffled.reverse();
        assert_eq!(part_url(&shuffled, 1).unwrap(), "http://s/1");
        let gap = vec![PartUrl { part_number: 1, url: "a".into() }, PartUrl { part_number: 3, url: "c".into() }];
        assert_eq!(part_url(&gap, 2).unwrap_err(), MultipartError::MissingPartUrl { number: 2 });
    }

    #[test]
    fn too_many_parts_names_size_part_size_and_count() {
        assert_eq!(check_fits(15, 5, None, &urls(3)), Ok(()));
        let err = check_fits(20_971_521, 5_242_880, Some(3), &urls(3)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the archive is 20971521 bytes and needs 5 parts of 5242880 bytes, but spec.upload has only 3 part URLs \
             (maxParts 3); sign the upload for a larger rootfs (more parts)"
        );
        assert_eq!(check_fits(1, 0, None, &urls(1)).unwrap_err(), MultipartError::ZeroPartSize);
    }

    #[test]
    fn completion_xml_orders_parts_and_escapes_etags() {
        let xml = complete_body(&[(2, "\"b&<2>\"".into()), (1, "\"a1\"".into())]);
        assert_eq!(
            xml,
            "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber><ETag>&quot;a1&quot;</ETag></Part>\
             <Part><PartNumber>2</PartNumber><ETag>&quot;b&amp;&lt;2&gt;&quot;</ETag></Part></CompleteMultipartUpload>"
        );
        assert_eq!(xml_escape("it's"), "it&apos;s");
    }

    #[test]
    fn completion_answer_must_be_2xx_without_an_error_document() {
        assert_eq!(
            check_complete(200, "<CompleteMultipartUploadResult><ETag>x</ETag></CompleteMultipartUploadResult>"),
            Ok(())
        );
        let err =
            check_complete(200, "<?xml version=\"1.0\"?>\n<Error><Code>InternalError</Code></Error>").unwrap_err();
        assert!(err.to_string().contains("HTTP 200 with an error document: <?xml"), "{err}");
        let err = check_complete(400, "<Error><Code>InvalidPart</Code></Error>").unwrap_err();
        assert_eq!(
            err.to_string(),
            "CompleteMultipartUpload answered HTTP 400: <Error><Code>InvalidPart</Code></Error>"
        );
        assert_eq!(excerpt(""), "(empty body)");
        assert_eq!(excerpt(&"x".repeat(400)).chars().count(), 301);
    }
}
