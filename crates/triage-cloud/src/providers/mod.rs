//! One file per provider: its wire structs, the translation to and from
//! [`triage_core::llm`], its error-status mapping and its unit tests.

pub mod anthropic;
pub mod gemini;
pub mod openai;
pub mod perspective;
pub(crate) mod sse;
