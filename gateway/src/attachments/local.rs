//! `LocalAttachments`: objects as files under the data directory, the embedded default.
//!
//! `objects/<first two hex digits>/<sha256>`, written to `tmp/` first and renamed into place once
//! whole and hashed, so a failed upload leaves only a temp file it deletes, and a retry (or the
//! same bytes sent again) finds its object already there and writes nothing new.

use std::io::SeekFrom;
use std::ops::Range;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use super::{AttachmentError, AttachmentStore, ByteStream, Hashing, Stored, check_address};

/// Bytes read per chunk when serving an object.
const READ_CHUNK: usize = 64 * 1024;

pub struct LocalAttachments {
    objects: PathBuf,
    tmp: PathBuf,
}

impl LocalAttachments {
    /// Opens (creating, mode 0700) `dir/objects` and `dir/tmp`; temp files of uploads cut short
    /// by a crash are removed.
    pub async fn open(dir: &Path) -> Result<Self, AttachmentError> {
        let objects = dir.join("objects");
        let tmp = dir.join("tmp");
        for d in [dir, &objects, &tmp] {
            create_private_dir(d).await?;
        }
        let mut leftovers = tokio::fs::read_dir(&tmp).await?;
        while let Some(entry) = leftovers.next_entry().await? {
            let _ = tokio::fs::remove_file(entry.path()).await;
        }
        Ok(Self { objects, tmp })
    }

    fn path_of(&self, sha256: &str) -> Result<PathBuf, AttachmentError> {
        check_address(sha256)?;
        Ok(self.objects.join(&sha256[..2]).join(sha256))
    }

    async fn write_aside(
        &self,
        file: &mut tokio::fs::File,
        mut body: ByteStream,
    ) -> Result<(String, u64), AttachmentError> {
        let mut hashing = Hashing::default();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(AttachmentError::Body)?;
            hashing.update(&chunk);
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        // On disk before it is named: a crash after the rename never leaves a short object.
        file.sync_data().await?;
        Ok(hashing.finish())
    }
}

async fn create_private_dir(dir: &Path) -> Result<(), AttachmentError> {
    let mut builder = tokio::fs::DirBuilder::new();
    builder.recursive(true).mode(0o700);
    builder.create(dir).await?;
    Ok(())
}

#[async_trait]
impl AttachmentStore for LocalAttachments {
    async fn ping(&self) -> Result<(), AttachmentError> {
        tokio::fs::metadata(&self.objects).await?;
        Ok(())
    }

    async fn put(&self, body: ByteStream) -> Result<Stored, AttachmentError> {
        let tmp = self.tmp.join(uuid::Uuid::now_v7().simple().to_string());
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .await?;
        let written = self.write_aside(&mut file, body).await;
        drop(file);
        let (sha256, size) = match written {
            Ok(done) => done,
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                return Err(e);
            }
        };
        let path = self.path_of(&sha256)?;
        if tokio::fs::try_exists(&path).await.unwrap_or(false) {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Ok(Stored {
                sha256,
                size,
                fresh: false,
            });
        }
        if let Some(parent) = path.parent() {
            create_private_dir(parent).await?;
        }
        // Atomic within one file system: readers see no object or the whole one. Two uploads
        // of the same bytes racing here both rename identical files onto one name.
        if let Err(e) = tokio::fs::rename(&tmp, &path).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e.into());
        }
        Ok(Stored {
            sha256,
            size,
            fresh: true,
        })
    }

    async fn get(
        &self,
        sha256: &str,
        range: Option<Range<u64>>,
    ) -> Result<ByteStream, AttachmentError> {
        let path = self.path_of(sha256)?;
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AttachmentError::NotFound(sha256.to_owned()));
            }
            Err(e) => return Err(e.into()),
        };
        let len = file.metadata().await?.len();
        let range = range.unwrap_or(0..len);
        if range.start > range.end || range.end > len {
            return Err(AttachmentError::Range(format!(
                "{}..{} of {len} bytes",
                range.start, range.end
            )));
        }
        file.seek(SeekFrom::Start(range.start)).await?;
        let left = range.end - range.start;
        let stream = futures::stream::unfold((file, left), |(mut file, left)| async move {
            if left == 0 {
                return None;
            }
            let want = left.min(READ_CHUNK as u64) as usize;
            let mut buf = BytesMut::zeroed(want);
            match file.read(&mut buf).await {
                Ok(0) => Some((
                    Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "the object ended early",
                    )),
                    (file, 0),
                )),
                Ok(n) => {
                    buf.truncate(n);
                    let chunk: Bytes = buf.freeze();
                    Some((Ok(chunk), (file, left - n as u64)))
                }
                Err(e) => Some((Err(e), (file, 0))),
            }
        });
        Ok(stream.boxed())
    }

    async fn size(&self, sha256: &str) -> Result<Option<u64>, AttachmentError> {
        let path = self.path_of(sha256)?;
        match tokio::fs::metadata(&path).await {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn count(&self) -> Result<u64, AttachmentError> {
        let mut n = 0;
        let mut shards = tokio::fs::read_dir(&self.objects).await?;
        while let Some(shard) = shards.next_entry().await? {
            if !shard.file_type().await?.is_dir() {
                continue;
            }
            let mut files = tokio::fs::read_dir(shard.path()).await?;
            while files.next_entry().await?.is_some() {
                n += 1;
            }
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_attachments_meet_the_attachment_store_contract() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = LocalAttachments::open(dir.path()).await.expect("opens");
        crate::attachments::contract::run(&store).await;
        // A failed body left no temp file behind.
        let mut tmp = std::fs::read_dir(dir.path().join("tmp")).expect("tmp dir");
        assert!(tmp.next().is_none(), "temp files were left behind");
    }

    #[tokio::test]
    async fn temp_files_of_an_interrupted_upload_are_removed_at_open() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(dir.path().join("tmp")).expect("mkdir");
        std::fs::write(dir.path().join("tmp").join("half"), b"half an upload").expect("write");
        LocalAttachments::open(dir.path()).await.expect("opens");
        assert!(!dir.path().join("tmp").join("half").exists());
    }
}
