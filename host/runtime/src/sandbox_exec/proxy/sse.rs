//! A `text/event-stream` parser (the WHATWG HTML "event stream
//! interpretation"): fields `data` (multi-line, joined with `\n`), `event`,
//! `id`; comments; LF, CRLF and CR line ends, also split across chunks; a
//! leading byte-order mark. An event is dispatched at its blank line; an
//! unterminated event at the end of the stream is dropped, as the spec says.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The `event` field, if any (the spec's default type is "message").
    pub event: Option<String>,
    /// The `data` lines joined with `\n`.
    pub data: String,
    /// The last `id` seen on the stream, if any.
    pub id: Option<String>,
}

/// A line longer than the parser's limit (a hostile or broken server).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineTooLong {
    /// The limit, bytes.
    pub limit: usize,
}

impl std::fmt::Display for LineTooLong {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "an event-stream line or event is longer than {} bytes", self.limit)
    }
}

/// Incremental parser state: feed it chunks as they arrive.
#[derive(Debug)]
pub struct Parser {
    line: Vec<u8>,
    data: String,
    has_data: bool,
    event: Option<String>,
    last_id: Option<String>,
    after_cr: bool,
    at_start: bool,
    limit: usize,
}

impl Parser {
    /// A parser refusing lines and events longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Parser {
            line: Vec::new(),
            data: String::new(),
            has_data: false,
            event: None,
            last_id: None,
            after_cr: false,
            at_start: true,
            limit,
        }
    }

    /// Feeds a chunk; returns the events it completed.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<Event>, LineTooLong> {
        const BOM: &[u8] = b"\xEF\xBB\xBF";
        let mut events = Vec::new();
        if self.at_start {
            // The BOM may itself arrive split: wait until three bytes are in.
            self.line.extend_from_slice(chunk);
            if self.line.len() < BOM.len() && BOM.starts_with(&self.line) {
                return Ok(events);
            }
            self.at_start = false;
            let pending = std::mem::take(&mut self.line);
            let start = if pending.starts_with(BOM) { BOM.len() } else { 0 };
            self.feed_bytes(&pending[start..], &mut events)?;
        } else {
            self.feed_bytes(chunk, &mut events)?;
        }
        Ok(events)
    }

    fn feed_bytes(&mut self, chunk: &[u8], events: &mut Vec<Event>) -> Result<(), LineTooLong> {
        for &byte in chunk {
            match byte {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\n' | b'\r' => {
                    self.after_cr = byte == b'\r';
                    let line = std::mem::take(&mut self.line);
                    if let Some(event) = self.line_done(&String::from_utf8_lossy(&line)) {
                        events.push(event);
                    }
                    if self.data.len() > self.limit {
                        return Err(LineTooLong { limit: self.limit });
                    }
                }
                _ => {
                    self.after_cr = false;
                    if self.line.len() >= self.limit {
                        return Err(LineTooLong { limit: self.limit });
                    }
                    self.line.push(byte);
                }
            }
        }
        Ok(())
    }

    fn line_done(&mut self, line: &str) -> Option<Event> {
        if line.is_empty() {
            let event = self.event.take();
            if !std::mem::take(&mut self.has_data) {
                return None;
            }
            let mut data = std::mem::take(&mut self.data);
            data.pop(); // the newline after the last data line
            return Some(Event { event, data, id: self.last_id.clone() });
        }
        if line.starts_with(':') {
            return None; // a comment (keepalives)
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "data" => {
                self.data.push_str(value);
                self.data.push('\n');
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_owned()),
            "id" if !value.contains('\0') => self.last_id = Some(value.to_owned()),
            _ => {} // "retry" and unknown fields: nothing for a one-shot follow
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_all(chunks: &[&[u8]]) -> Vec<Event> {
        let mut parser = Parser::new(1 << 20);
        chunks.iter().flat_map(|c| parser.feed(c).unwrap()).collect()
    }

    fn data(events: &[Event]) -> Vec<&str> {
        events.iter().map(|e| e.data.as_str()).collect()
    }

    #[test]
    fn joins_multi_line_data_and_dispatches_at_the_blank_line() {
        let events = parse_all(&[b"data: first\ndata: second\n\ndata:third\n\n"]);
        assert_eq!(data(&events), ["first\nsecond", "third"]);
    }

    #[test]
    fn skips_comments_and_unknown_fields_and_keeps_event_and_id() {
        let events = parse_all(&[b": keepalive\nretry: 5\nevent: output\nid: 7\nfoo: bar\ndata: x\n\n: again\n\n"]);
        assert_eq!(events, [Event { event: Some("output".into()), data: "x".into(), id: Some("7".into()) }]);
    }

    #[test]
    fn accepts_crlf_and_cr_line_ends_even_split_across_chunks() {
        let events = parse_all(&[b"data: a\r", b"\ndata: b\r\n\r", b"\ndata: c\r\rdata: d\n\n"]);
        assert_eq!(data(&events), ["a\nb", "c", "d"]);
    }

    #[test]
    fn keeps_a_value_without_its_one_leading_space_only() {
        let events = parse_all(&[b"data:  two spaces\ndata\ndata:\n\n"]);
        assert_eq!(data(&events), [" two spaces\n\n"]);
    }

    #[test]
    fn reassembles_events_fed_byte_by_byte_with_split_utf8() {
        let text = "\u{feff}data: {\"line\":\"h\u{e9}llo \u{1f600}\"}\n\n".as_bytes();
        let chunks: Vec<&[u8]> = text.chunks(1).collect();
        assert_eq!(data(&parse_all(&chunks)), ["{\"line\":\"h\u{e9}llo \u{1f600}\"}"]);
    }

    #[test]
    fn drops_an_event_the_stream_did_not_finish_and_empty_events() {
        assert!(parse_all(&[b"\n\nevent: x\n\ndata: cut"]).is_empty());
    }

    #[test]
    fn refuses_an_endless_line() {
        let mut parser = Parser::new(16);
        assert_eq!(parser.feed(&[b'a'; 17]), Err(LineTooLong { limit: 16 }));
        let mut parser = Parser::new(16);
        let err = parser.feed(b"data: 0123456789\ndata: 0123456789\n");
        assert_eq!(err, Err(LineTooLong { limit: 16 }), "data gathered over lines counts too");
    }
}
