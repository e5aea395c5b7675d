//! Just enough of the NATS client protocol (plain text over TCP: CONNECT,
//! SUB, UNSUB, PUB, MSG, PING/PONG) to find wasmCloud hosts and call their
//! workload API. One connection, used by one task at a time.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// Largest message this client accepts (the server's default max_payload).
const MAX_PAYLOAD: usize = 1 << 20;

/// A message delivered on a subscription.
#[derive(Debug, Clone)]
pub struct Message {
    pub subject: String,
    pub sid: u64,
    pub payload: Vec<u8>,
}

/// A connection to a NATS server.
pub struct Nats {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    next_sid: u64,
    inbox_prefix: String,
    /// A line read in part when a timeout interrupted it (read_line is not
    /// cancel-safe, so the partial line is kept here, not lost).
    partial: String,
}

impl Nats {
    /// Connects to `nats://host:port` (or `host:port`) and completes the handshake.
    pub async fn connect(url: &str) -> Result<Nats> {
        let addr = url.strip_prefix("nats://").unwrap_or(url).trim_end_matches('/');
        let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
            .await
            .with_context(|| format!("connect to NATS at {addr}: timed out"))?
            .with_context(|| format!("connect to NATS at {addr}"))?;
        stream.set_nodelay(true)?;
        let (read, writer) = stream.into_split();
        let nanos = jiff::Timestamp::now().as_nanosecond();
        let mut nats = Nats {
            reader: BufReader::new(read),
            writer,
            next_sid: 1,
            inbox_prefix: format!("_INBOX.snapsign.{}.{nanos}", std::process::id()),
            partial: String::new(),
        };
        let info = nats.read_line(Duration::from_secs(10)).await.context("read the server's INFO")?;
        if !info.starts_with("INFO ") {
            bail!("{addr} is not a NATS server (it said {info:?})");
        }
        nats.writer
            .write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false,\"name\":\"snapsign\",\"lang\":\"rust\",\"version\":\"0.1.0\",\"protocol\":1}\r\nPING\r\n")
            .await?;
        loop {
            let line = nats.read_line(Duration::from_secs(10)).await.context("wait for the server's PONG")?;
            match line.as_str() {
                "PONG" => return Ok(nats),
                "+OK" => {}
                _ if line.starts_with("-ERR") => bail!("NATS at {addr} refused the connection: {line}"),
                _ => {}
            }
        }
    }

    /// Subscribes to `subject` (wildcards allowed); returns the subscription id.
    pub async fn subscribe(&mut self, subject: &str) -> Result<u64> {
        check_subject(subject)?;
        let sid = self.next_sid;
        self.next_sid += 1;
        self.writer.write_all(format!("SUB {subject} {sid}\r\n").as_bytes()).await.context("send SUB")?;
        Ok(sid)
    }

    /// Ends subscription `sid`.
    pub async fn unsubscribe(&mut self, sid: u64) -> Result<()> {
        self.writer.write_all(format!("UNSUB {sid}\r\n").as_bytes()).await.context("send UNSUB")
    }

    /// Publishes `payload` on `subject`, answers going to `reply`.
    pub async fn publish(&mut self, subject: &str, reply: Option<&str>, payload: &[u8]) -> Result<()> {
        check_subject(subject)?;
        if payload.len() > MAX_PAYLOAD {
            bail!("payload of {} bytes is over NATS's {MAX_PAYLOAD}", payload.len());
        }
        let head = match reply {
            Some(reply) => format!("PUB {subject} {reply} {}\r\n", payload.len()),
            None => format!("PUB {subject} {}\r\n", payload.len()),
        };
        let mut frame = head.into_bytes();
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        self.writer.write_all(&frame).await.context("send PUB")
    }

    /// The next message on any subscription, or `None` after `timeout`.
    pub async fn next_message(&mut self, timeout: Duration) -> Result<Option<Message>> {
        let deadline = Instant::now() + timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Ok(None);
            }
            let line = match self.read_line(remaining).await {
                Ok(line) => line,
                Err(e) if e.downcast_ref::<tokio::time::error::Elapsed>().is_some() => return Ok(None),
                Err(e) => return Err(e),
            };
            if line == "PING" {
                self.writer.write_all(b"PONG\r\n").await.context("send PONG")?;
                continue;
            }
            if line.starts_with("-ERR") {
                bail!("NATS error: {line}");
            }
            let Some(rest) = line.strip_prefix("MSG ") else { continue }; // +OK, PONG, INFO
            let fields: Vec<&str> = rest.split_whitespace().collect();
            let (subject, sid, size) = match fields.as_slice() {
                [subject, sid, size] | [subject, sid, _, size] => (*subject, *sid, *size),
                _ => bail!("malformed MSG line from NATS: {line:?}"),
            };
            let sid: u64 = sid.parse().with_context(|| format!("bad sid in {line:?}"))?;
            let size: usize = size.parse().with_context(|| format!("bad size in {line:?}"))?;
            if size > MAX_PAYLOAD {
                bail!("NATS message of {size} bytes is over {MAX_PAYLOAD}");
            }
            let mut payload = vec![0; size + 2];
            tokio::time::timeout(remaining.max(Duration::from_secs(5)), self.reader.read_exact(&mut payload))
                .await
                .context("read a NATS message body: timed out")?
                .context("read a NATS message body")?;
            payload.truncate(size);
            return Ok(Some(Message { subject: subject.to_owned(), sid, payload }));
        }
    }

    /// Sends `payload` to `subject` and waits up to `timeout` for the first answer.
    pub async fn request(&mut self, subject: &str, payload: &[u8], timeout: Duration) -> Result<Vec<u8>> {
        let inbox = format!("{}.{}", self.inbox_prefix, self.next_sid);
        let sid = self.subscribe(&inbox).await?;
        self.publish(subject, Some(&inbox), payload).await?;
        let deadline = Instant::now() + timeout;
        let answer = loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.next_message(remaining).await? {
                Some(message) if message.sid == sid => break Ok(message.payload),
                Some(_) => continue, // another subscription's message
                None => {
                    break Err(anyhow::anyhow!("no answer on {subject} within {timeout:?} (is anything serving it?)"));
                }
            }
        };
        self.unsubscribe(sid).await?;
        answer
    }

    /// Sends each `(subject, payload)` at once and waits up to `timeout` for
    /// all answers; answers come back in the order of `requests`.
    pub async fn request_all(&mut self, requests: &[(String, Vec<u8>)], timeout: Duration) -> Result<Vec<Vec<u8>>> {
        let mut sids = Vec::new();
        for (subject, payload) in requests {
            let inbox = format!("{}.{}", self.inbox_prefix, self.next_sid);
            let sid = self.subscribe(&inbox).await?;
            self.publish(subject, Some(&inbox), payload).await?;
            sids.push(sid);
        }
        let mut answers: Vec<Option<Vec<u8>>> = vec![None; requests.len()];
        let deadline = Instant::now() + timeout;
        while answers.iter().any(Option::is_none) {
            let remaining = deadline.saturating_duration_since(Instant::now());
            let Some(message) = self.next_message(remaining).await? else {
                let missing: Vec<&str> = requests
                    .iter()
                    .zip(&answers)
                    .filter(|(_, a)| a.is_none())
                    .map(|((subject, _), _)| subject.as_str())
                    .collect();
                bail!("no answer on {} within {timeout:?} (is anything serving it?)", missing.join(", "));
            };
            if let Some(i) = sids.iter().position(|sid| *sid == message.sid) {
                answers[i].get_or_insert(message.payload);
            }
        }
        for sid in sids {
            self.unsubscribe(sid).await?;
        }
        Ok(answers.into_iter().flatten().collect())
    }

    async fn read_line(&mut self, timeout: Duration) -> Result<String> {
        let read = tokio::time::timeout(timeout, self.reader.read_line(&mut self.partial)).await?;
        if read.context("read from NATS")? == 0 {
            bail!("NATS closed the connection");
        }
        let line = std::mem::take(&mut self.partial);
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    }
}

/// Subjects are tokens separated by dots, without whitespace.
fn check_subject(subject: &str) -> Result<()> {
    if subject.is_empty() || subject.chars().any(char::is_whitespace) || subject.split('.').any(str::is_empty) {
        bail!("'{subject}' is not a valid NATS subject");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_with_spaces_or_empty_tokens_are_refused() {
        assert!(check_subject("runtime.host.abc.workload.start").is_ok());
        assert!(check_subject("runtime.operator.heartbeat.>").is_ok());
        for bad in ["", "a b", "a..b", ".a", "a.", "a\r\nPUB x 1"] {
            assert!(check_subject(bad).is_err(), "{bad:?}");
        }
    }
}
