//! Server-sent events (the WHATWG `text/event-stream` format) over a response
//! body, and the loop that turns a provider's events into [`ChatChunk`]s.
//!
//! Bytes are buffered until a line ends, so a `data:` line (or a multi-byte
//! character) split across network chunks is put back together. Lines end in
//! LF, CRLF or a lone CR; a blank line dispatches the event; `:` starts a
//! comment; several `data:` lines join with `\n`. An event left without its
//! blank line at the end of the body is dropped, as the format says: the
//! providers then notice that their terminator never came.

use std::collections::VecDeque;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use triage_core::llm::ChatChunk;

use crate::error::{ErrorKind, ProviderError};
use crate::provider::ChunkStream;

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Event {
    /// The `event:` name, `message` when the event had none.
    pub event: String,
    pub data: String,
}

/// The incremental line parser.
#[derive(Debug, Default)]
pub(crate) struct Parser {
    line: Vec<u8>,
    /// The last byte fed was a CR: a LF right after it ends the same line.
    after_cr: bool,
    started: bool,
    event: String,
    data: String,
    has_data: bool,
}

impl Parser {
    pub fn feed(&mut self, mut bytes: &[u8], out: &mut VecDeque<Event>) {
        if !self.started && !bytes.is_empty() {
            self.started = true;
            bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
        }
        for &b in bytes {
            if std::mem::take(&mut self.after_cr) && b == b'\n' {
                continue;
            }
            match b {
                b'\n' => self.end_line(out),
                b'\r' => {
                    self.end_line(out);
                    self.after_cr = true;
                }
                _ => self.line.push(b),
            }
        }
    }

    fn end_line(&mut self, out: &mut VecDeque<Event>) {
        let raw = std::mem::take(&mut self.line);
        let line = String::from_utf8_lossy(&raw);
        if line.is_empty() {
            if std::mem::take(&mut self.has_data) {
                let name = std::mem::take(&mut self.event);
                out.push_back(Event {
                    event: if name.is_empty() {
                        "message".to_owned()
                    } else {
                        name
                    },
                    data: std::mem::take(&mut self.data),
                });
            }
            self.event.clear();
            self.data.clear();
            return;
        }
        if line.starts_with(':') {
            return;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_ref(), ""),
        };
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            // `id` and `retry` matter only to browsers that reconnect.
            _ => {}
        }
    }
}

type ByteStream = Pin<Box<dyn Stream<Item = reqwest::Result<Bytes>> + Send>>;

/// The events of a response body.
pub(crate) struct Events {
    body: ByteStream,
    parser: Parser,
    ready: VecDeque<Event>,
    ended: bool,
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events")
            .field("ready", &self.ready.len())
            .finish_non_exhaustive()
    }
}

impl Events {
    pub fn new(body: impl Stream<Item = reqwest::Result<Bytes>> + Send + 'static) -> Self {
        Self {
            body: Box::pin(body),
            parser: Parser::default(),
            ready: VecDeque::new(),
            ended: false,
        }
    }
}

impl Stream for Events {
    type Item = reqwest::Result<Event>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            if let Some(event) = this.ready.pop_front() {
                return Poll::Ready(Some(Ok(event)));
            }
            if this.ended {
                return Poll::Ready(None);
            }
            match this.body.as_mut().poll_next(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(bytes))) => this.parser.feed(&bytes, &mut this.ready),
                Poll::Ready(Some(Err(e))) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(None) => this.ended = true,
            }
        }
    }
}

/// What a provider's decoder made of one event.
#[derive(Debug)]
pub(crate) enum Step {
    /// Chunks to pass on; more events follow.
    More(Vec<ChatChunk>),
    /// The provider's terminator: these are the last chunks.
    Done(Vec<ChatChunk>),
}

/// A provider's translation from its events to chunks.
pub(crate) trait Decode: Send + 'static {
    fn event(&mut self, event: Event) -> Result<Step, ProviderError>;
    /// The body ended without `Step::Done`: the last chunks, or
    /// `StreamTruncated` when the provider's terminator never came.
    fn eof(&mut self) -> Result<Vec<ChatChunk>, ProviderError>;
}

struct Driver<D> {
    provider: String,
    events: Events,
    decoder: D,
    queue: VecDeque<Result<ChatChunk, ProviderError>>,
    first_event_timeout: Option<Duration>,
    finished: bool,
}

/// Chunks from a streaming response. The first event must come within
/// `first_event_timeout`; a read error mid-stream is `StreamTruncated`; after
/// an error the stream ends.
pub(crate) fn chunk_stream<D: Decode>(
    provider: &str,
    response: reqwest::Response,
    first_event_timeout: Duration,
    decoder: D,
) -> ChunkStream {
    let driver = Driver {
        provider: provider.to_owned(),
        events: Events::new(response.bytes_stream()),
        decoder,
        queue: VecDeque::new(),
        first_event_timeout: Some(first_event_timeout),
        finished: false,
    };
    Box::pin(futures_util::stream::unfold(driver, |mut d| async move {
        loop {
            if let Some(item) = d.queue.pop_front() {
                return Some((item, d));
            }
            if d.finished {
                return None;
            }
            let next = match d.first_event_timeout.take() {
                Some(limit) => match tokio::time::timeout(limit, d.events.next()).await {
                    Ok(next) => next,
                    Err(_) => {
                        d.finished = true;
                        let e = super::timeout_error(&d.provider, limit, "first event");
                        d.queue.push_back(Err(e));
                        continue;
                    }
                },
                None => d.events.next().await,
            };
            let result = match next {
                Some(Ok(event)) => d.decoder.event(event),
                Some(Err(e)) => {
                    let e = e.without_url();
                    let kind = if e.is_timeout() {
                        ErrorKind::Timeout
                    } else {
                        ErrorKind::StreamTruncated
                    };
                    Err(
                        ProviderError::new(&d.provider, kind, format!("stream broke off: {e}"))
                            .with_source(e),
                    )
                }
                None => d.decoder.eof().map(Step::Done),
            };
            match result {
                Ok(Step::More(chunks)) => d.queue.extend(chunks.into_iter().map(Ok)),
                Ok(Step::Done(chunks)) => {
                    d.finished = true;
                    d.queue.extend(chunks.into_iter().map(Ok));
                }
                Err(e) => {
                    d.finished = true;
                    d.queue.push_back(Err(e));
                }
            }
        }
    }))
}

/// The error for a stream that ended before the provider's terminator.
pub(crate) fn truncated(provider: &str, terminator: &str) -> ProviderError {
    ProviderError::new(
        provider,
        ErrorKind::StreamTruncated,
        format!("the stream ended without {terminator}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(pieces: &[&[u8]]) -> Vec<Event> {
        let mut parser = Parser::default();
        let mut out = VecDeque::new();
        for piece in pieces {
            parser.feed(piece, &mut out);
        }
        out.into()
    }

    fn ev(event: &str, data: &str) -> Event {
        Event {
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn data_lines_split_across_chunks_are_joined() {
        let events = parse(&[b"da", b"ta: {\"a\":", b"1}\n", b"\n", b"data: x\n\n"]);
        assert_eq!(events, vec![ev("message", "{\"a\":1}"), ev("message", "x")]);
    }

    #[test]
    fn multi_line_data_event_names_and_comments() {
        let events = parse(&[
            b": keep-alive\n\nevent: message_start\ndata: one\ndata:two\ndata\n\n",
            b"event: ping\ndata: {}\n\n",
        ]);
        assert_eq!(
            events,
            vec![ev("message_start", "one\ntwo\n"), ev("ping", "{}")]
        );
    }

    #[test]
    fn crlf_and_lone_cr_end_lines_even_split_between_chunks() {
        let events = parse(&[b"data: a\r", b"\n\r", b"\ndata: b\r\rdata: c\r\n\r\n"]);
        assert_eq!(
            events,
            vec![ev("message", "a"), ev("message", "b"), ev("message", "c")]
        );
    }

    #[test]
    fn multibyte_characters_split_across_chunks_survive() {
        let text = "data: h\u{e9}llo \u{1F600}\n\n".as_bytes();
        let (a, b) = text.split_at(9);
        assert_eq!(parse(&[a, b]), vec![ev("message", "h\u{e9}llo \u{1F600}")]);
    }

    #[test]
    fn an_event_without_its_blank_line_at_the_end_is_dropped() {
        assert_eq!(
            parse(&[b"data: done\n\ndata: partial\n"]),
            vec![ev("message", "done")]
        );
    }

    #[test]
    fn events_without_data_are_not_dispatched_and_bom_is_skipped() {
        let events = parse(&[b"\xEF\xBB\xBFevent: x\n\nid: 3\nretry: 10\ndata: y\n\n"]);
        assert_eq!(events, vec![ev("message", "y")]);
    }

    #[tokio::test]
    async fn events_stream_over_byte_chunks() {
        let body = futures_util::stream::iter(vec![
            Ok(Bytes::from_static(b"event: a\nda")),
            Ok(Bytes::from_static(b"ta: 1\n\n")),
        ]);
        let events: Vec<_> = Events::new(body).collect().await;
        let events: Vec<Event> = events.into_iter().map(|e| e.unwrap()).collect();
        assert_eq!(events, vec![ev("a", "1")]);
    }
}
