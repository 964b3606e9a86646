//! Attachment bytes behind one trait (a local directory, or an S3-compatible bucket), stored
//! content-addressed by SHA-256, with its contract tests; `media` sniffs types and makes thumbnails.
//!
//! The metadata (who uploaded what to which conversation) lives in the relational
//! [`crate::store::Store`]; this trait keeps only objects, keyed by the hex SHA-256 of their bytes,
//! so a retried upload (or the same file sent twice) is one object.

mod local;
pub mod media;
mod s3;

use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use sha2::{Digest, Sha256};
use thiserror::Error;

pub use local::LocalAttachments;
pub use s3::{S3Attachments, S3Settings};

/// Bytes flowing in or out of a store, chunk by chunk: never a whole file in memory.
pub type ByteStream = BoxStream<'static, Result<Bytes, std::io::Error>>;

#[derive(Debug, Error)]
pub enum AttachmentError {
    /// The body being stored failed (the client went away, or it grew past the limit): nothing
    /// was kept.
    #[error("upload body failed: {0}")]
    Body(std::io::Error),
    #[error("attachment storage I/O failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("object store failed: {0}")]
    Object(#[from] object_store::Error),
    #[error("no object {0}")]
    NotFound(String),
    #[error("a range outside the object: {0}")]
    Range(String),
}

/// What a `put` stored: the object's address and length.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// Lower-case hex SHA-256 of the bytes: the object's key.
    pub sha256: String,
    pub size: u64,
    /// `false` when an object with these bytes was already stored (nothing new was written).
    pub fresh: bool,
}

#[async_trait]
pub trait AttachmentStore: Send + Sync + 'static {
    /// Cheap round trip for readiness.
    async fn ping(&self) -> Result<(), AttachmentError>;
    /// Streams `body` into the store under the SHA-256 of its bytes. Written aside first and
    /// moved into place only once whole: a body that fails midway leaves nothing behind.
    async fn put(&self, body: ByteStream) -> Result<Stored, AttachmentError>;
    /// The object's bytes, or those in `range` (end exclusive, within the object).
    async fn get(
        &self,
        sha256: &str,
        range: Option<Range<u64>>,
    ) -> Result<ByteStream, AttachmentError>;
    /// The object's length, if it is stored.
    async fn size(&self, sha256: &str) -> Result<Option<u64>, AttachmentError>;
    /// How many objects are stored (operators, and tests asserting what was not stored).
    async fn count(&self) -> Result<u64, AttachmentError>;
}

/// Hashes and counts bytes as they pass, for the stores' streamed writes.
#[derive(Default)]
pub(crate) struct Hashing {
    hasher: Sha256,
    size: u64,
}

impl Hashing {
    pub fn update(&mut self, chunk: &[u8]) {
        self.hasher.update(chunk);
        self.size += chunk.len() as u64;
    }

    pub fn finish(self) -> (String, u64) {
        let digest = self.hasher.finalize();
        let mut hex = String::with_capacity(64);
        for b in digest {
            hex.push_str(&format!("{b:02x}"));
        }
        (hex, self.size)
    }
}

/// A SHA-256 address is 64 lower-case hex digits; anything else never reaches a path or key.
pub(crate) fn check_address(sha256: &str) -> Result<(), AttachmentError> {
    if sha256.len() == 64
        && sha256
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        Ok(())
    } else {
        Err(AttachmentError::NotFound(sha256.chars().take(80).collect()))
    }
}

/// Reads a whole stream; for tests and for thumbnails (whose input is capped by the upload
/// limit and decoded anyway).
pub async fn collect(mut stream: ByteStream) -> Result<Vec<u8>, AttachmentError> {
    use futures::StreamExt;
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk?);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod contract;
