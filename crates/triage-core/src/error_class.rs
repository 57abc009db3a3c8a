//! What a caller can do about a failed request, independent of transport:
//! the server maps each class to one HTTP status and OpenAI error code, the
//! CLI to an exit status.

use std::time::Duration;

/// The class of a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// The task, model or route named does not exist.
    NotFound,
    /// The caller's input is at fault; retrying the same request won't help.
    BadInput,
    /// The input is over a configured limit.
    TooLarge,
    /// Local capacity is full now; retry after the given time.
    Overloaded { retry_after: Duration },
    /// A dollar budget this request counts against is spent for its period:
    /// tiers that cost nothing may still answer other requests.
    BudgetExceeded,
    /// The server cannot record more work now (its cost ledger is behind or
    /// its database is failing): nothing ran; retry after the given time.
    Saturated { retry_after: Duration },
    /// Every hosted model that could answer is rate limited, overloaded or
    /// shut off by its circuit breaker for now.
    Unavailable { retry_after: Duration },
    /// The tier that had to answer has no usable provider (its API key is
    /// not set): nothing was sent, and retrying won't help until an operator
    /// sets it.
    NotConfigured,
    /// A hosted provider failed or answered something unusable.
    BadGateway,
    /// A tier or provider ran out of time.
    Timeout,
    /// Anything else: a bug or a broken installation.
    Internal,
}
