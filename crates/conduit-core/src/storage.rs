//! Where finished videos live: a local folder (`file://PATH`) or an S3 bucket
//! (`s3://bucket/prefix`, credentials from the usual AWS environment variables), behind
//! the `object_store` abstraction. Writes are atomic (a temporary object renamed into
//! place, or a single S3 PUT), so a half-written video is never served.

use std::{ops::Range, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{bail, Context};
use bytes::Bytes;
use object_store::{
    aws::{AmazonS3, AmazonS3Builder},
    local::LocalFileSystem,
    path::Path,
    signer::Signer,
    Attribute, Attributes, ObjectStore, PutOptions, PutPayload,
};
use reqwest::Method;

/// The video store shared by the generator (writes) and the API (reads, signs URLs).
#[derive(Clone)]
pub struct VideoStore {
    store: Arc<dyn ObjectStore>,
    /// Set for S3, which hands out pre-signed URLs instead of having the API serve bytes.
    s3: Option<Arc<AmazonS3>>,
    prefix: Path,
    /// The store keeps object attributes (S3 does; a local folder refuses them), so a
    /// video is stored with its `Content-Type`.
    keeps_attributes: bool,
}

/// The media type of every stored video, which S3 hands back on a pre-signed GET.
pub const VIDEO_CONTENT_TYPE: &str = "video/mp4";

impl std::fmt::Debug for VideoStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VideoStore")
            .field("store", &self.store.to_string())
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl VideoStore {
    /// Opens `file://PATH` (relative paths are relative to the working directory; the
    /// folder is created) or `s3://bucket/prefix`.
    pub fn from_url(url: &str) -> anyhow::Result<Self> {
        if let Some(path) = url.strip_prefix("file://") {
            let root = PathBuf::from(path);
            std::fs::create_dir_all(&root)
                .with_context(|| format!("creating video folder {}", root.display()))?;
            let root = root
                .canonicalize()
                .with_context(|| format!("resolving video folder {}", root.display()))?;
            let store = LocalFileSystem::new_with_prefix(&root)
                .with_context(|| format!("opening video folder {}", root.display()))?;
            return Ok(Self {
                store: Arc::new(store),
                s3: None,
                prefix: Path::default(),
                keeps_attributes: false,
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                bail!("storage URL {url:?} names no bucket");
            }
            let s3 = Arc::new(
                AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .build()
                    .with_context(|| format!("configuring S3 bucket {bucket}"))?,
            );
            return Ok(Self {
                store: s3.clone(),
                s3: Some(s3),
                prefix: Path::from(prefix.trim_matches('/')),
                keeps_attributes: true,
            });
        }
        bail!("unsupported storage URL {url:?}: use file://PATH or s3://bucket/prefix")
    }

    fn path(&self, key: &str) -> Path {
        let key = Path::from(key);
        self.prefix.parts().chain(key.parts()).collect()
    }

    /// What every video is stored with: `Content-Type: video/mp4` where the store keeps it.
    fn put_options(&self) -> PutOptions {
        let mut attributes = Attributes::new();
        if self.keeps_attributes {
            attributes.insert(Attribute::ContentType, VIDEO_CONTENT_TYPE.into());
        }
        PutOptions {
            attributes,
            ..PutOptions::default()
        }
    }

    /// Stores `bytes` under `key`, replacing any earlier object atomically.
    pub async fn put(&self, key: &str, bytes: Bytes) -> anyhow::Result<()> {
        self.store
            .put_opts(
                &self.path(key),
                PutPayload::from_bytes(bytes),
                self.put_options(),
            )
            .await
            .with_context(|| format!("storing video {key}"))?;
        Ok(())
    }

    /// Size of the object, or `None` when it does not exist.
    pub async fn size(&self, key: &str) -> anyhow::Result<Option<u64>> {
        match self.store.head(&self.path(key)).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(err) => Err(err).with_context(|| format!("inspecting video {key}")),
        }
    }

    /// The bytes of `range` (end exclusive).
    pub async fn get_range(&self, key: &str, range: Range<u64>) -> anyhow::Result<Bytes> {
        self.store
            .get_range(&self.path(key), range)
            .await
            .with_context(|| format!("reading video {key}"))
    }

    /// A pre-signed GET URL when the store can make one (S3), else `None` and the API
    /// serves the bytes itself.
    pub async fn presigned_url(&self, key: &str, ttl: Duration) -> anyhow::Result<Option<String>> {
        let Some(s3) = &self.s3 else {
            return Ok(None);
        };
        let url = s3
            .signed_url(Method::GET, &self.path(key), ttl)
            .await
            .with_context(|| format!("signing URL for video {key}"))?;
        Ok(Some(url.to_string()))
    }
}

/// The storage key of a task attempt's video.
pub fn video_key(task_id: uuid::Uuid, attempt: i32) -> String {
    format!("videos/{task_id}/{attempt}.mp4")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn local_store_round_trips_and_reads_ranges() {
        let dir = std::env::temp_dir().join(format!("conduit-store-{}", uuid::Uuid::new_v4()));
        let store = VideoStore::from_url(&format!("file://{}", dir.display())).unwrap();
        let key = video_key(uuid::Uuid::nil(), 1);
        assert_eq!(store.size(&key).await.unwrap(), None);
        store
            .put(&key, Bytes::from_static(b"0123456789"))
            .await
            .unwrap();
        assert_eq!(store.size(&key).await.unwrap(), Some(10));
        assert_eq!(&store.get_range(&key, 2..5).await.unwrap()[..], b"234");
        assert_eq!(
            store
                .presigned_url(&key, Duration::from_secs(60))
                .await
                .unwrap(),
            None
        );
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn stored_videos_carry_their_content_type() {
        // The in-memory store keeps attributes as S3 does.
        let store = VideoStore {
            store: Arc::new(object_store::memory::InMemory::new()),
            s3: None,
            prefix: Path::from("pre"),
            keeps_attributes: true,
        };
        let key = video_key(uuid::Uuid::nil(), 2);
        store
            .put(&key, Bytes::from_static(b"mp4 bytes"))
            .await
            .unwrap();
        let got = store
            .store
            .get(&Path::from(format!("pre/{key}")))
            .await
            .unwrap();
        assert_eq!(
            got.attributes
                .get(&Attribute::ContentType)
                .map(|v| v.as_ref()),
            Some(VIDEO_CONTENT_TYPE)
        );

        // The S3 store asks for it on every put.
        let s3 = VideoStore::from_url("s3://bucket/videos").unwrap();
        let options = s3.put_options();
        assert_eq!(
            options
                .attributes
                .get(&Attribute::ContentType)
                .map(|v| v.as_ref()),
            Some("video/mp4")
        );
    }

    #[test]
    fn refuses_unknown_schemes() {
        assert!(VideoStore::from_url("ftp://x/y").is_err());
        assert!(VideoStore::from_url("s3:///prefix").is_err());
    }
}
