//! The image of an image-to-video job (`image_url`), for the providers that need its
//! bytes rather than its URL (the built-in renderer, the `/v1/videos` protocol's
//! `input_reference`, Veo's `bytesBase64Encoded`). A `data:image/png|jpeg;base64,` URI is
//! decoded; an `http`/`https` URL is fetched, refusing internal addresses as the API does
//! (unless `CONDUIT__WEBHOOKS__ALLOW_PRIVATE_TARGETS`) on the address actually dialled,
//! following no redirect. Either way the result is at most [`MAX_IMAGE_BYTES`] and must
//! be a PNG or a JPEG.

use std::{net::SocketAddr, time::Duration};

use base64::Engine;
use bytes::{Bytes, BytesMut};
use conduit_core::netguard::is_forbidden_ip;
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use super::GenerationError;

/// Largest image accepted, decoded.
pub const MAX_IMAGE_BYTES: usize = 10 << 20;

/// A PNG or JPEG image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputImage {
    pub bytes: Bytes,
    /// `image/png` or `image/jpeg`, from the file's own signature.
    pub mime: &'static str,
}

impl InputImage {
    /// The image's bytes if they are a PNG or a JPEG.
    pub fn sniff(bytes: Bytes) -> Result<Self, String> {
        let mime = if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
            "image/png"
        } else if bytes.starts_with(&[0xff, 0xd8, 0xff]) {
            "image/jpeg"
        } else {
            return Err("the image is neither a PNG nor a JPEG".into());
        };
        Ok(Self { bytes, mime })
    }

    pub fn base64(&self) -> String {
        base64::engine::general_purpose::STANDARD.encode(&self.bytes)
    }

    /// File name for a multipart upload.
    pub fn file_name(&self) -> &'static str {
        if self.mime == "image/png" {
            "first_frame.png"
        } else {
            "first_frame.jpg"
        }
    }
}

/// Decodes a `data:image/png;base64,...` or `data:image/jpeg;base64,...` URI; `None` when
/// `raw` is not a data URI at all.
pub fn decode_data_uri(raw: &str) -> Option<Result<InputImage, String>> {
    let rest = raw.strip_prefix("data:")?;
    Some((|| {
        let (meta, data) = rest
            .split_once(',')
            .ok_or("the data URI has no ',' before its data")?;
        let meta = meta.to_ascii_lowercase();
        if meta != "image/png;base64" && meta != "image/jpeg;base64" {
            return Err(
                "the data URI must be data:image/png;base64, or data:image/jpeg;base64,".into(),
            );
        }
        if data.len() > MAX_IMAGE_BYTES / 3 * 4 + 4 {
            return Err(format!(
                "the image is larger than {} MiB",
                MAX_IMAGE_BYTES >> 20
            ));
        }
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim_end())
            .map_err(|e| format!("the data URI is not valid base64 ({e})"))?;
        if bytes.len() > MAX_IMAGE_BYTES {
            return Err(format!(
                "the image is larger than {} MiB",
                MAX_IMAGE_BYTES >> 20
            ));
        }
        InputImage::sniff(bytes.into())
    })())
}

/// Reads job images; cheap to clone.
#[derive(Clone, Debug)]
pub struct ImageLoader {
    allow_private: bool,
}

impl ImageLoader {
    /// `allow_private`: `CONDUIT__WEBHOOKS__ALLOW_PRIVATE_TARGETS`, which also lets an
    /// image live on a loopback or private address (development and tests).
    pub fn new(allow_private: bool) -> Self {
        Self { allow_private }
    }

    /// The image of `image_url`, or a user-facing reason it cannot be had.
    pub async fn load(
        &self,
        image_url: &str,
        cancel: &CancellationToken,
    ) -> Result<InputImage, GenerationError> {
        if let Some(decoded) = decode_data_uri(image_url) {
            return decoded.map_err(|why| GenerationError::Failed(format!("image_url: {why}")));
        }
        tokio::select! {
            fetched = self.fetch(image_url) => fetched.map_err(|why| {
                GenerationError::Failed(format!("Could not read image_url: {why}"))
            }),
            () = cancel.cancelled() => Err(GenerationError::Cancelled),
        }
    }

    async fn fetch(&self, raw: &str) -> Result<InputImage, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("not a URL ({e})"))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err("it must be an http or https URL".into());
        }
        let host = url
            .host_str()
            .ok_or("it names no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = url.port_or_known_default().unwrap_or(443);
        let lookup = tokio::net::lookup_host((host.as_str(), port));
        let addrs: Vec<SocketAddr> = tokio::time::timeout(Duration::from_secs(10), lookup)
            .await
            .map_err(|_| format!("resolving {host} took too long"))?
            .map_err(|e| format!("could not resolve {host} ({e})"))?
            .collect();
        // Pin the connection to an address checked here, so DNS cannot answer
        // differently when the client dials.
        let addr = addrs
            .iter()
            .find(|a| self.allow_private || !is_forbidden_ip(a.ip()))
            .copied()
            .ok_or_else(|| match addrs.first() {
                Some(a) => format!(
                    "{host} is {}, a private, loopback or otherwise internal address",
                    a.ip()
                ),
                None => format!("{host} has no address"),
            })?;
        let client = reqwest::Client::builder()
            .user_agent(concat!("conduit-generator/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .resolve(&host, addr)
            .build()
            .map_err(|e| format!("no HTTP client ({e})"))?;
        let response = client
            .get(url)
            .send()
            .await
            .map_err(|e| format!("the request failed ({e})"))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("the server answered HTTP {}", status.as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|n| n > MAX_IMAGE_BYTES as u64)
        {
            return Err(format!(
                "the image is larger than {} MiB",
                MAX_IMAGE_BYTES >> 20
            ));
        }
        let mut body = BytesMut::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("the download was cut off ({e})"))?;
            if body.len() + chunk.len() > MAX_IMAGE_BYTES {
                return Err(format!(
                    "the image is larger than {} MiB",
                    MAX_IMAGE_BYTES >> 20
                ));
            }
            body.extend_from_slice(&chunk);
        }
        InputImage::sniff(body.freeze())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PNG_1X1: &str = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==";

    #[test]
    fn data_uris_decode_and_are_checked() {
        let ok = decode_data_uri(&format!("data:image/png;base64,{PNG_1X1}"))
            .expect("a data URI")
            .expect("a PNG");
        assert_eq!(ok.mime, "image/png");
        assert!(decode_data_uri("https://example.com/a.png").is_none());
        for bad in [
            format!("data:image/gif;base64,{PNG_1X1}"),
            format!("data:image/png,{PNG_1X1}"),
            "data:image/png;base64,@@@".to_owned(),
            "data:image/jpeg;base64,aGVsbG8=".to_owned(),
        ] {
            assert!(decode_data_uri(&bad).expect("a data URI").is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn internal_addresses_are_refused_unless_allowed() {
        let loader = ImageLoader::new(false);
        let err = loader
            .load("http://127.0.0.1:9/a.png", &CancellationToken::new())
            .await
            .expect_err("loopback refused");
        assert!(err.to_string().contains("internal address"), "{err}");
        let err = loader
            .load("http://localhost:9/a.png", &CancellationToken::new())
            .await
            .expect_err("loopback name refused");
        assert!(err.to_string().contains("internal address"), "{err}");
    }
}
