//! What a task's tiers would cost and score, measured offline over the
//! engine's public API: `triage audit` (a cascade's bands, a router's or
//! pipeline's settings), `triage calibrate` (the band that keeps a target
//! accuracy on unseen data), the answer cache that lets both replay hosted
//! answers without paying twice, drift of the local tier against its shadow
//! checks in the ledger, and the reports (HTML, SVG, PNG) they write. The
//! runtime (`triage-engine`) and the server never link this crate.

// `AuditError` carries the engine's error by value, as `EngineError` carries
// the local specialist's: built at most once per item, its size costs
// nothing measurable.
#![allow(clippy::result_large_err)]

pub mod answer_cache;
pub mod audit;
pub mod calibrate;
pub mod drift;
pub mod render;
pub mod task_audit;
