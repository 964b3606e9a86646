//! The domain's error: every failure a client can see, with its stable wire code.

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq)]
pub enum ChatError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    TooLarge(String),
    /// Content of a type the gateway does not take (as sniffed from its bytes): `invalid`, with
    /// HTTP's own status for it.
    #[error("{0}")]
    UnsupportedType(String),
    #[error("{0}")]
    Conflict(String),
    #[error("too many requests, retry in {retry_after_ms} ms")]
    RateLimited { retry_after_ms: u64 },
    /// A backend failed; the detail was logged where it happened and is not shown to clients.
    #[error("the service is temporarily unavailable, try again")]
    Unavailable,
}

impl ChatError {
    /// The stable code clients switch on. The one place domain errors meet the wire.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized(_) => "unauthorized",
            Self::Forbidden(_) => "forbidden",
            Self::NotFound(_) => "not_found",
            Self::Invalid(_) | Self::UnsupportedType(_) => "invalid",
            Self::TooLarge(_) => "too_large",
            Self::Conflict(_) => "conflict",
            Self::RateLimited { .. } => "rate_limited",
            Self::Unavailable => "unavailable",
        }
    }

    /// The HTTP status that goes with the code.
    pub fn http_status(&self) -> u16 {
        match self {
            Self::Unauthorized(_) => 401,
            Self::Forbidden(_) => 403,
            Self::NotFound(_) => 404,
            Self::Conflict(_) => 409,
            Self::TooLarge(_) => 413,
            Self::UnsupportedType(_) => 415,
            Self::Invalid(_) => 422,
            Self::RateLimited { .. } => 429,
            Self::Unavailable => 503,
        }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Self::Invalid(msg.into())
    }

    pub fn forbidden(msg: impl Into<String>) -> Self {
        Self::Forbidden(msg.into())
    }

    pub fn not_found(msg: impl Into<String>) -> Self {
        Self::NotFound(msg.into())
    }
}
