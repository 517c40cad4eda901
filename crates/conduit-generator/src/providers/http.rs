//! What the remote adapters share: one HTTP client per provider account with the bearer
//! credential, requests retried with back-off and jitter on rate limits and transient
//! failures (`Retry-After` honoured), status polling that slows down over time, a
//! download with one retry, and the stop of an upstream job the worker no longer waits
//! for. Every user-facing message goes through [`Upstream::failed`], which strips the
//! credential from it, so a provider that echoes the key cannot leak it into a task.

use std::{future::Future, pin::Pin, sync::LazyLock, time::Duration};

use bytes::{Bytes, BytesMut};
use conduit_core::{config::ProviderAccount, Secret};
use futures::StreamExt;
use rand::Rng;
use reqwest::{header::RETRY_AFTER, Method, RequestBuilder, StatusCode};
use serde::de::DeserializeOwned;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn, Instrument};

use super::{GeneratedVideo, GenerationContext, GenerationError, ProgressUpdate};

/// Attempts of one request while it keeps being rate limited or failing transiently.
const MAX_ATTEMPTS: u32 = 8;
/// Longest pause between two attempts of a request, `Retry-After` included.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(120);
/// Status polls slow down from the configured interval to at most this many times it.
const POLL_SLOWDOWN: u32 = 8;
/// Largest video file accepted from a provider.
const MAX_VIDEO_BYTES: usize = 2 << 30;

/// Stops of upstream jobs still in flight (spawned when the worker drops a provider run).
static STOPS: LazyLock<TaskTracker> = LazyLock::new(TaskTracker::new);

/// Waits until the upstream stops (cancel requests) sent so far have finished, for at
/// most `within`. A shutting-down generator calls this so its last cancels go out.
pub async fn settle_upstream_stops(within: Duration) {
    STOPS.close();
    let _ = tokio::time::timeout(within, STOPS.wait()).await;
    STOPS.reopen();
}

/// How a provider wants its credential.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Auth {
    /// `Authorization: Bearer <key>` (MiniMax, OpenAI-compatible, Replicate).
    Bearer,
    /// `Authorization: Key <key>` (fal).
    Key,
    /// The key in a header of its own (`x-goog-api-key` for the Gemini API).
    Header(&'static str),
}

/// One provider account: where it is, how to authenticate, how fast to poll.
#[derive(Clone)]
pub(crate) struct Upstream {
    /// How messages name the provider ("MiniMax", "Replicate").
    pub name: &'static str,
    base: String,
    key: Secret,
    auth: Auth,
    client: reqwest::Client,
    downloads: reqwest::Client,
    /// First interval between status polls, and the base of retry back-off.
    pub poll: Duration,
}

/// One answer of the provider's API.
pub(crate) struct Reply {
    pub status: StatusCode,
    pub retry_after: Option<Duration>,
    pub body: Bytes,
}

impl Reply {
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, String> {
        serde_json::from_slice(&self.body).map_err(|e| format!("an unreadable answer ({e})"))
    }

    /// The start of the body, for an error message.
    pub fn snippet(&self) -> String {
        let text = String::from_utf8_lossy(&self.body);
        let text = text.trim();
        match text.char_indices().nth(300) {
            Some((cut, _)) => format!("{}...", &text[..cut]),
            None => text.to_owned(),
        }
    }

    /// The usual handling of a rate limit (429) or a transient server failure (408, 5xx):
    /// try again later. `None` for anything else.
    pub fn transient<T>(&self) -> Option<Step<T>> {
        if self.status == StatusCode::TOO_MANY_REQUESTS {
            return Some(Step::Retry {
                after: self.retry_after,
                why: "rate limited (HTTP 429)".into(),
            });
        }
        if self.status.is_server_error() || self.status == StatusCode::REQUEST_TIMEOUT {
            return Some(Step::Retry {
                after: self.retry_after,
                why: format!("HTTP {}", self.status.as_u16()),
            });
        }
        None
    }
}

/// What to do with one answer.
pub(crate) enum Step<T> {
    Done(T),
    /// Try the same request again after a pause (at least `after` when given).
    Retry {
        after: Option<Duration>,
        why: String,
    },
    /// Give up with this user-facing reason.
    Fail(String),
}

impl Upstream {
    /// The client of `account`; `setting` is where its credential comes from.
    pub fn new(
        name: &'static str,
        setting: &'static str,
        account: &ProviderAccount,
    ) -> anyhow::Result<Self> {
        let key = account
            .api_key
            .clone()
            .ok_or_else(|| anyhow::anyhow!("{setting} is not set"))?;
        anyhow::ensure!(
            url::Url::parse(&account.base_url).is_ok(),
            "the base URL of {name} is not a URL"
        );
        let user_agent = concat!("conduit-generator/", env!("CARGO_PKG_VERSION"));
        let client = reqwest::Client::builder()
            .user_agent(user_agent)
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()?;
        let downloads = reqwest::Client::builder()
            .user_agent(user_agent)
            .connect_timeout(Duration::from_secs(10))
            .read_timeout(Duration::from_secs(60))
            .timeout(Duration::from_secs(30 * 60))
            .build()?;
        let poll = Duration::from_secs_f64(account.poll_interval_seconds.clamp(0.001, 3600.0));
        Ok(Self {
            name,
            base: account.base_url.trim_end_matches('/').to_owned(),
            key,
            auth: Auth::Bearer,
            client,
            downloads,
            poll,
        })
    }

    /// `path` (starting with `/`) under the account's base URL.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// The same account with another way of presenting its credential.
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = auth;
        self
    }

    fn authorize(&self, request: RequestBuilder) -> RequestBuilder {
        let key = self.key.expose();
        match self.auth {
            Auth::Bearer => request.bearer_auth(key),
            Auth::Key => request.header(reqwest::header::AUTHORIZATION, format!("Key {key}")),
            Auth::Header(name) => request.header(name, key),
        }
    }

    /// A request to the provider's API with its credential.
    pub fn request(&self, method: Method, path: &str) -> RequestBuilder {
        self.authorize(self.client.request(method, self.url(path)))
    }

    /// A request to an absolute URL the provider handed out (fal's `status_url`). The
    /// credential goes along only to the provider's own API host.
    pub fn request_url(&self, method: Method, url: &str) -> RequestBuilder {
        let request = self.client.request(method, url);
        if same_origin(url, &self.base) {
            self.authorize(request)
        } else {
            request
        }
    }

    /// True when `url` is on the provider's own API host.
    pub fn is_own(&self, url: &str) -> bool {
        same_origin(url, &self.base)
    }

    /// `text` with the credential blanked out.
    pub fn redact(&self, text: &str) -> String {
        let key = self.key.expose();
        if key.is_empty() {
            text.to_owned()
        } else {
            text.replace(key, "***")
        }
    }

    /// A user-facing failure, without the credential.
    pub fn failed(&self, message: impl AsRef<str>) -> GenerationError {
        GenerationError::Failed(self.redact(message.as_ref()))
    }

    /// Back-off before attempt `attempt + 1`: the poll interval doubled per attempt,
    /// at least `after`, with up to 20 % jitter, at most [`MAX_RETRY_PAUSE`].
    fn backoff(&self, attempt: u32, after: Option<Duration>) -> Duration {
        let doubled = self.poll.saturating_mul(1 << attempt.min(16));
        let pause = jitter(doubled).max(after.unwrap_or(Duration::ZERO));
        pause.min(MAX_RETRY_PAUSE)
    }

    /// Sends the request `build` makes until `classify` is done with an answer, retrying
    /// transport errors and whatever `classify` calls a retry, with back-off.
    pub async fn call<T>(
        &self,
        cancel: &CancellationToken,
        what: &str,
        build: impl Fn() -> RequestBuilder,
        classify: impl Fn(&Reply) -> Step<T>,
    ) -> Result<T, GenerationError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let step = match until_cancelled(cancel, build().send()).await? {
                Ok(response) => {
                    let status = response.status();
                    let retry_after = response
                        .headers()
                        .get(RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.trim().parse::<f64>().ok())
                        .filter(|s| s.is_finite() && *s >= 0.0)
                        .map(|s| Duration::from_secs_f64(s.min(MAX_RETRY_PAUSE.as_secs_f64())));
                    match until_cancelled(cancel, response.bytes()).await? {
                        Ok(body) => classify(&Reply {
                            status,
                            retry_after,
                            body,
                        }),
                        Err(err) => Step::Retry {
                            after: None,
                            why: format!("the answer was cut off ({err})"),
                        },
                    }
                }
                Err(err) => Step::Retry {
                    after: None,
                    why: transport_error(&err),
                },
            };
            match step {
                Step::Done(value) => return Ok(value),
                Step::Fail(message) => return Err(self.failed(message)),
                Step::Retry { after, why } => {
                    let why = self.redact(&why);
                    if attempt >= MAX_ATTEMPTS {
                        // Rate limits, server failures and unreachable servers: another
                        // model (`fallback`) may still make the video.
                        return Err(GenerationError::Unavailable(self.redact(&format!(
                            "Gave up trying to {what} at {} after {attempt} attempts: {why}",
                            self.name
                        ))));
                    }
                    let pause = self.backoff(attempt - 1, after);
                    warn!(provider = self.name, attempt, reason = %why, pause_ms = pause.as_millis() as u64, "{what}: trying again");
                    sleep(cancel, pause).await?;
                }
            }
        }
    }

    /// The last step of every remote generation: reports the download (95 %, "Downloading
    /// the video from `from`"), fetches the finished file from `url` and hands it over.
    pub async fn fetch_video(
        &self,
        ctx: &GenerationContext,
        url: &str,
        from: &str,
        upstream_id: &str,
    ) -> Result<GeneratedVideo, GenerationError> {
        ctx.progress.report(ProgressUpdate {
            percent: 95,
            message: format!("Downloading the video from {from}"),
            eta_seconds: None,
        });
        let bytes = self.download(&ctx.cancel, url).await?;
        info!(
            provider = self.name,
            upstream_id,
            bytes = bytes.len(),
            "video downloaded"
        );
        Ok(GeneratedVideo {
            bytes,
            frames_rendered: None,
        })
    }

    /// Downloads the finished video from `url`, trying once more if the first attempt
    /// fails. The credential goes along only when `url` is on the provider's own API
    /// host; a CDN link gets none.
    async fn download(
        &self,
        cancel: &CancellationToken,
        url: &str,
    ) -> Result<Bytes, GenerationError> {
        let mut last = String::new();
        for attempt in 1..=2 {
            if attempt > 1 {
                sleep(cancel, jitter(self.poll)).await?;
            }
            match until_cancelled(cancel, self.download_once(url)).await? {
                Ok(bytes) => return Ok(bytes),
                Err(why) => {
                    warn!(provider = self.name, attempt, reason = %self.redact(&why), "video download failed");
                    last = why;
                }
            }
        }
        Err(self.failed(format!(
            "Downloading the finished video from {} failed twice: {last}",
            self.name
        )))
    }

    async fn download_once(&self, url: &str) -> Result<Bytes, String> {
        let mut request = self.downloads.get(url);
        if same_origin(url, &self.base) {
            request = self.authorize(request);
        }
        let response = request.send().await.map_err(|e| transport_error(&e))?;
        let status = response.status();
        if !status.is_success() {
            return Err(format!("HTTP {}", status.as_u16()));
        }
        let mut body = BytesMut::new();
        let mut stream = response.bytes_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| format!("the download was cut off ({e})"))?;
            if body.len() + chunk.len() > MAX_VIDEO_BYTES {
                return Err(format!(
                    "the file is larger than {} MiB",
                    MAX_VIDEO_BYTES >> 20
                ));
            }
            body.extend_from_slice(&chunk);
        }
        let body = body.freeze();
        if !looks_like_mp4(&body) {
            return Err(format!(
                "the file is not an MP4 video ({} bytes)",
                body.len()
            ));
        }
        Ok(body)
    }

    /// Arms a stop of the upstream job: `stop` is sent if the guard is dropped while
    /// armed, that is when the worker stops waiting (cancel, timeout, shutdown) or the
    /// adapter gives up before the upstream job ended.
    ///
    /// While the attempt is being handed back (shutdown) the upstream job is left
    /// running: the run that takes the attempt over resumes it.
    pub fn stop_on_drop<F>(&self, ctx: &GenerationContext, what: String, stop: F) -> StopGuard
    where
        F: Future<Output = Result<(), String>> + Send + 'static,
    {
        let name = self.name;
        let key = self.key.clone();
        let upstream = ctx.upstream.clone();
        StopGuard(Some(Box::pin(async move {
            if upstream.handing_back() {
                tracing::info!(
                    provider = name,
                    "{what}: skipped, the attempt is handed back"
                );
                return;
            }
            match tokio::time::timeout(Duration::from_secs(30), stop).await {
                Ok(Ok(())) => tracing::info!(provider = name, "{what}: done"),
                Ok(Err(why)) => {
                    warn!(provider = name, reason = %redact_with(&key, &why), "{what}: failed")
                }
                Err(_) => warn!(provider = name, "{what}: no answer within 30 s"),
            }
        })))
    }

    /// A request for a stop future: sent once, its answer's status checked.
    pub fn stop_request(
        &self,
        method: Method,
        path: &str,
    ) -> impl Future<Output = Result<(), String>> + Send + 'static {
        Self::stop_with(self.request(method, path))
    }

    /// A stop future of an absolute URL the provider handed out (fal's `cancel_url`).
    pub fn stop_request_url(
        &self,
        method: Method,
        url: &str,
    ) -> impl Future<Output = Result<(), String>> + Send + 'static {
        Self::stop_with(self.request_url(method, url))
    }

    async fn stop_with(request: RequestBuilder) -> Result<(), String> {
        let response = request.send().await.map_err(|e| transport_error(&e))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("HTTP {}", status.as_u16()))
        }
    }
}

/// Sends an upstream stop when dropped while armed; see [`Upstream::stop_on_drop`].
pub(crate) struct StopGuard(Option<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl StopGuard {
    /// The upstream job ended by itself: nothing to stop any more.
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for StopGuard {
    fn drop(&mut self) {
        let Some(stop) = self.0.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            STOPS.spawn(stop.instrument(tracing::Span::current()));
        } else {
            debug!("no runtime left to stop an upstream job");
        }
    }
}

/// Spaces out status polls: the configured interval at first, then half as long again
/// each time up to [`POLL_SLOWDOWN`] times it, each pause with up to 20 % jitter.
pub(crate) struct Poller {
    next: Duration,
    cap: Duration,
}

impl Poller {
    pub fn new(up: &Upstream) -> Self {
        Self {
            next: up.poll,
            cap: up.poll.saturating_mul(POLL_SLOWDOWN),
        }
    }

    pub async fn wait(&mut self, cancel: &CancellationToken) -> Result<(), GenerationError> {
        let pause = jitter(self.next);
        self.next = self.next.mul_f64(1.5).min(self.cap);
        sleep(cancel, pause).await
    }
}

/// Progress of a provider that reports no percentage: it creeps from 20 towards 90 while
/// the provider says it is generating.
#[derive(Default)]
pub(crate) struct ProgressEstimate {
    generating_since: Option<std::time::Instant>,
}

impl ProgressEstimate {
    /// The percentage and message while `provider` is generating.
    pub(crate) fn generating(&mut self, provider: &str) -> (u8, String) {
        let since = *self
            .generating_since
            .get_or_insert_with(std::time::Instant::now);
        (
            creep(20, 90, since.elapsed(), Duration::from_secs(60)),
            format!("Generating at {provider}"),
        )
    }
}

/// A progress estimate for a provider that reports none: from `from` towards `to`,
/// half way after `half_life` of `elapsed`.
pub(crate) fn creep(from: u8, to: u8, elapsed: Duration, half_life: Duration) -> u8 {
    let share = 1.0 - 0.5f64.powf(elapsed.as_secs_f64() / half_life.as_secs_f64().max(0.001));
    let span = f64::from(to.saturating_sub(from));
    from.saturating_add((span * share).floor() as u8).min(to)
}

fn jitter(d: Duration) -> Duration {
    d.mul_f64(rand::rng().random_range(0.8..=1.2))
}

async fn sleep(cancel: &CancellationToken, pause: Duration) -> Result<(), GenerationError> {
    tokio::select! {
        () = tokio::time::sleep(pause) => Ok(()),
        () = cancel.cancelled() => Err(GenerationError::Cancelled),
    }
}

async fn until_cancelled<T>(
    cancel: &CancellationToken,
    work: impl Future<Output = T>,
) -> Result<T, GenerationError> {
    tokio::select! {
        out = work => Ok(out),
        () = cancel.cancelled() => Err(GenerationError::Cancelled),
    }
}

fn transport_error(err: &reqwest::Error) -> String {
    if err.is_timeout() {
        "no answer in time".into()
    } else if err.is_connect() {
        "could not connect".into()
    } else {
        format!("the request failed ({err})")
    }
}

fn redact_with(key: &Secret, text: &str) -> String {
    if key.expose().is_empty() {
        text.to_owned()
    } else {
        text.replace(key.expose(), "***")
    }
}

fn same_origin(url: &str, base: &str) -> bool {
    match (url::Url::parse(url), url::Url::parse(base)) {
        (Ok(a), Ok(b)) => a.origin() == b.origin(),
        _ => false,
    }
}

/// An MP4 file starts with a box whose type is `ftyp` (or, rarely, other top-level boxes).
fn looks_like_mp4(bytes: &[u8]) -> bool {
    bytes.len() >= 8
        && matches!(
            &bytes[4..8],
            b"ftyp" | b"moov" | b"mdat" | b"free" | b"skip" | b"wide" | b"styp"
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn creep_approaches_but_never_passes_its_ceiling() {
        let h = Duration::from_secs(60);
        assert_eq!(creep(20, 90, Duration::ZERO, h), 20);
        assert_eq!(creep(20, 90, h, h), 55);
        assert!(creep(20, 90, Duration::from_secs(6000), h) <= 90);
        assert!(creep(20, 90, Duration::from_secs(300), h) > creep(20, 90, h, h));
    }

    #[test]
    fn the_credential_goes_only_to_the_api_host() {
        assert!(same_origin(
            "https://api.minimax.io/v1/files/retrieve?file_id=1",
            "https://api.minimax.io"
        ));
        assert!(!same_origin(
            "https://cdn.hailuoai.com/v.mp4",
            "https://api.minimax.io"
        ));
        assert!(!same_origin(
            "http://api.minimax.io/x",
            "https://api.minimax.io"
        ));
    }

    #[test]
    fn mp4_sniffing() {
        assert!(looks_like_mp4(b"\0\0\0\x18ftypisom...."));
        assert!(!looks_like_mp4(b"<html><body>error</body></html>"));
        assert!(!looks_like_mp4(b""));
    }

    #[test]
    fn backoff_grows_honours_retry_after_and_stays_bounded() {
        let account = ProviderAccount {
            api_key: Some(Secret::new("sk-test")),
            base_url: "http://127.0.0.1:9".into(),
            poll_interval_seconds: 1.0,
        };
        let up = Upstream::new("X", "X_KEY", &account).unwrap();
        let first = up.backoff(0, None);
        assert!(first >= Duration::from_millis(800) && first <= Duration::from_millis(1200));
        let third = up.backoff(2, None);
        assert!(third >= Duration::from_millis(3200), "{third:?}");
        assert!(up.backoff(0, Some(Duration::from_secs(7))) >= Duration::from_secs(7));
        assert!(up.backoff(30, None) <= MAX_RETRY_PAUSE);
        assert_eq!(up.redact("key sk-test here"), "key *** here");
    }
}
