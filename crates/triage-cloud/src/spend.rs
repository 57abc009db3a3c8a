//! Spending gates: the gateway asks the caller's gate to hold each attempt's
//! worst-case cost (its *ceiling*) before the attempt is sent, and settles
//! the hold with what the attempt cost once it is over. A hold that is
//! dropped unsettled (the attempt may have been billed, its usage is not
//! known) keeps its ceiling as spent.
//!
//! The ceiling is an upper bound, not a guess: input tokens are bounded by
//! the bytes sent (a byte-level BPE tokenizer never makes more tokens than
//! bytes; a few tokens per message are added for the chat template), output
//! tokens by the `max_tokens` the gateway sends on every chat call.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use triage_core::llm::{ChatRequest, ModerationRequest, Usage};

/// A boxed future, for the object-safe gate.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Output tokens a chat call is capped at when neither the caller, the tier
/// nor the provider's `max_tokens` sets a cap: triage never sends an
/// uncapped call.
pub const DEFAULT_MAX_TOKENS: u32 = 4096;

/// Tokens added per message for the chat template (role markers and
/// separators; OpenAI documents 3-4 per message, 8 leaves room).
const TOKENS_PER_MESSAGE: u64 = 8;
/// Tokens added per request (the reply's priming, a tool or schema preamble).
const TOKENS_PER_REQUEST: u64 = 16;

/// One attempt that is about to be sent, and the most it can cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Charge {
    pub provider: String,
    pub model: String,
    /// The worst case in US dollars (see the module doc).
    pub ceiling_usd: f64,
}

/// Holds money for attempts (the engine's budgets).
pub trait SpendGate: Send + Sync + fmt::Debug {
    /// Hold `charge.ceiling_usd`, or refuse with a reason the caller reads
    /// (the attempt is then not sent).
    fn hold(&self, charge: Charge) -> BoxFuture<'_, Result<Box<dyn SpendHold>, String>>;
}

/// Money held for one attempt. Dropping it unsettled counts the ceiling.
pub trait SpendHold: Send + fmt::Debug {
    /// The attempt is over and cost `usd` (its reported usage, priced).
    fn settle(self: Box<Self>, usd: f64);
}

/// The usage an attempt cannot exceed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UsageBound {
    pub input_tokens: u64,
    /// `None`: the chat cap the gateway sends (the provider's `max_tokens`,
    /// else [`DEFAULT_MAX_TOKENS`]).
    pub output_tokens: Option<u64>,
    pub audio_seconds: f64,
}

impl UsageBound {
    /// A chat request: every byte of its messages and schema a token, plus
    /// the template's tokens; its own `max_tokens` out.
    pub fn chat(req: &ChatRequest) -> Self {
        let bytes: usize = req.messages.iter().map(|m| m.content.len()).sum();
        let schema = req
            .json_schema
            .as_ref()
            .map_or(0, |s| s.schema.to_string().len() + s.name.len());
        Self {
            input_tokens: (bytes + schema) as u64
                + TOKENS_PER_MESSAGE * req.messages.len() as u64
                + TOKENS_PER_REQUEST,
            output_tokens: req.max_tokens.map(u64::from),
            audio_seconds: 0.0,
        }
    }

    pub fn moderation(req: &ModerationRequest) -> Self {
        let bytes: usize = req.input.iter().map(String::len).sum();
        Self {
            input_tokens: bytes as u64 + TOKENS_PER_MESSAGE * req.input.len() as u64,
            output_tokens: Some(0),
            audio_seconds: 0.0,
        }
    }

    /// The bound as usage, with `default_output` where the output is the
    /// gateway's own cap.
    pub fn usage(&self, default_output: u32) -> Usage {
        Usage {
            input_tokens: self.input_tokens,
            output_tokens: self
                .output_tokens
                .unwrap_or_else(|| u64::from(default_output)),
            ..Usage::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use triage_core::llm::Message;

    #[test]
    fn a_chat_bound_counts_every_byte_and_the_template() {
        let req = ChatRequest {
            messages: vec![Message::system("ab"), Message::user("héllo")],
            max_tokens: Some(7),
            ..ChatRequest::default()
        };
        let b = UsageBound::chat(&req);
        // 2 + 6 bytes, 2 messages, one request.
        assert_eq!(b.input_tokens, 8 + 16 + 16);
        assert_eq!(b.usage(99).output_tokens, 7);
        let uncapped = ChatRequest {
            max_tokens: None,
            ..req
        };
        assert_eq!(UsageBound::chat(&uncapped).usage(99).output_tokens, 99);
    }
}
