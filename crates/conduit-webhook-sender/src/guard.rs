//! The target guard on the address actually dialled. The API refuses internal targets
//! at submit time, but a name may resolve elsewhere by the time an attempt is made (DNS
//! rebinding). So the sender's HTTP client resolves every host through
//! [`GuardedResolver`], which drops forbidden addresses and fails when none is left, and
//! a URL whose host is a literal address (which reqwest dials without resolving) is
//! checked by [`TargetGuard::check_url`] before the request is built. Both use
//! [`conduit_core::netguard::is_forbidden_ip`].

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use conduit_core::netguard::is_forbidden_ip;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use url::{Host, Url};

/// Why a target was refused without sending anything.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum Refusal {
    #[error("webhook URL is not a valid http(s) URL")]
    BadUrl,
    #[error("webhook target {0} is a loopback, private or otherwise internal address")]
    ForbiddenAddress(IpAddr),
    #[error("webhook host {0} resolves only to loopback, private or otherwise internal addresses")]
    ForbiddenName(String),
}

/// Whether internal targets are refused (`webhooks.allow_private_targets = false`).
#[derive(Debug, Clone, Copy)]
pub struct TargetGuard {
    allow_private: bool,
}

impl TargetGuard {
    pub fn new(allow_private: bool) -> Self {
        Self { allow_private }
    }

    /// Parses `raw` and refuses a non-http(s) URL or a literal internal address. Names
    /// are left to [`GuardedResolver`], which checks what they resolve to on each dial.
    pub fn check_url(&self, raw: &str) -> Result<Url, Refusal> {
        let url = Url::parse(raw).map_err(|_| Refusal::BadUrl)?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refusal::BadUrl);
        }
        // The WHATWG parser already turned shorthand forms such as `127.1` or `0x7f.1`
        // into their IPv4 address.
        let ip = match url.host() {
            Some(Host::Ipv4(v4)) => IpAddr::V4(v4),
            Some(Host::Ipv6(v6)) => IpAddr::V6(v6),
            Some(Host::Domain(_)) => return Ok(url),
            None => return Err(Refusal::BadUrl),
        };
        if !self.allow_private && is_forbidden_ip(ip) {
            return Err(Refusal::ForbiddenAddress(ip));
        }
        Ok(url)
    }

    /// The resolver the HTTP client uses for names, when internal targets are refused.
    pub fn resolver(&self) -> Option<Arc<GuardedResolver>> {
        (!self.allow_private).then(|| Arc::new(GuardedResolver))
    }
}

/// Resolves with the system resolver and keeps only addresses a webhook may go to.
#[derive(Debug, Default)]
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            // The port is replaced by the connector; only the addresses matter here.
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed = allowed_addresses(resolved);
            if allowed.is_empty() {
                return Err(Box::new(Refusal::ForbiddenName(host)) as _);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

/// The addresses of `resolved` a webhook may be sent to.
pub fn allowed_addresses(resolved: Vec<SocketAddr>) -> Vec<SocketAddr> {
    resolved
        .into_iter()
        .filter(|a| !is_forbidden_ip(a.ip()))
        .collect()
}

/// The guard's refusal somewhere in an error's source chain (the resolver's error comes
/// back wrapped by reqwest and hyper).
pub fn refusal_in<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refusal> {
    let mut current: Option<&'a (dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(r) = e.downcast_ref::<Refusal>() {
            return Some(r);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_literal_loopback_in_every_spelling() {
        let guard = TargetGuard::new(false);
        for raw in [
            "http://127.0.0.1:8080/hook",
            "http://127.1/hook",
            "http://0x7f.0.0.1/hook",
            "http://2130706433/hook",
            "http://0177.0.0.1/hook",
            "http://[::1]:9000/hook",
            "http://[::ffff:127.0.0.1]/hook",
            "http://[::ffff:7f00:1]/hook",
            "http://[::ffff:0:127.0.0.1]/hook",
            "http://[::127.0.0.1]/hook",
            "https://0.0.0.0/hook",
            "http://[::]/hook",
            "http://169.254.169.254/latest/meta-data",
            "http://10.0.0.1/",
            "http://[fd00::1]/",
            "http://[64:ff9b::7f00:1]/",
        ] {
            assert!(
                matches!(guard.check_url(raw), Err(Refusal::ForbiddenAddress(_))),
                "{raw} must be refused"
            );
        }
    }

    #[test]
    fn leaves_names_to_the_resolver_and_allows_public_literals() {
        let guard = TargetGuard::new(false);
        assert!(guard.check_url("http://localhost:1234/x").is_ok());
        assert!(guard.check_url("https://example.com/x").is_ok());
        assert!(guard.check_url("https://8.8.8.8/x").is_ok());
        assert!(guard.resolver().is_some());
    }

    #[test]
    fn allows_everything_when_private_targets_are_allowed() {
        let guard = TargetGuard::new(true);
        assert!(guard.check_url("http://127.0.0.1:8080/hook").is_ok());
        assert!(guard.check_url("http://[::1]/hook").is_ok());
        assert!(guard.resolver().is_none());
    }

    #[test]
    fn refuses_urls_that_are_not_http() {
        let guard = TargetGuard::new(true);
        for raw in [
            "ftp://example.com/x",
            "file:///etc/passwd",
            "not a url",
            "unix:/run/x",
        ] {
            assert_eq!(guard.check_url(raw), Err(Refusal::BadUrl), "{raw}");
        }
    }

    #[test]
    fn filters_resolved_addresses() {
        let addrs: Vec<SocketAddr> = ["127.0.0.1:0", "8.8.8.8:0", "[::1]:0", "[::ffff:10.0.0.1]:0"]
            .iter()
            .map(|a| a.parse().unwrap())
            .collect();
        let allowed = allowed_addresses(addrs);
        assert_eq!(allowed, vec!["8.8.8.8:0".parse::<SocketAddr>().unwrap()]);
    }

    #[tokio::test]
    async fn resolver_refuses_localhost() {
        let resolver = GuardedResolver;
        let err = match resolver.resolve("localhost".parse().unwrap()).await {
            Ok(_) => panic!("localhost must not resolve through the guard"),
            Err(e) => e,
        };
        assert!(matches!(refusal_in(&*err), Some(Refusal::ForbiddenName(_))));
    }
}
