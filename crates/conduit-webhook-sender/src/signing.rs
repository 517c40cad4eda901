//! Standard Webhooks signatures: `v1,` + base64 of HMAC-SHA256 over
//! `{webhook-id}.{webhook-timestamp}.{body}`, keyed with the base64-decoded part of the
//! `whsec_` secret, so the reference `standardwebhooks` libraries verify it unchanged.
//! Public so that other crates and tests check signatures exactly the way receivers do.

use base64::{engine::general_purpose::STANDARD, Engine as _};
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The prefix of every signing secret.
pub const SECRET_PREFIX: &str = "whsec_";

/// A secret that is not `whsec_` followed by base64.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("the webhook signing secret is not base64 after its whsec_ prefix")]
pub struct InvalidSecret;

/// The decoded HMAC key of one `whsec_` secret.
#[derive(Clone)]
pub struct SigningKey(Vec<u8>);

impl SigningKey {
    /// Decodes `whsec_<base64>`; the prefix is optional, as in the reference libraries.
    pub fn parse(secret: &str) -> Result<Self, InvalidSecret> {
        let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
        let key = STANDARD.decode(encoded).map_err(|_| InvalidSecret)?;
        if key.is_empty() {
            return Err(InvalidSecret);
        }
        Ok(Self(key))
    }

    fn mac(&self, id: &str, timestamp: i64, body: &str) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = <HmacSha256 as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        mac.update(id.as_bytes());
        mac.update(b".");
        mac.update(timestamp.to_string().as_bytes());
        mac.update(b".");
        mac.update(body.as_bytes());
        mac
    }

    /// The `webhook-signature` header value: `v1,<base64>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &str) -> String {
        let digest = self.mac(id, timestamp, body).finalize().into_bytes();
        format!("v1,{}", STANDARD.encode(digest))
    }

    /// True when any `v1` signature of the space-separated `header` matches, compared in
    /// constant time. The timestamp's freshness is the caller's business.
    pub fn verify(&self, id: &str, timestamp: i64, body: &str, header: &str) -> bool {
        header.split(' ').any(|candidate| {
            let Some(("v1", encoded)) = candidate.split_once(',') else {
                return false;
            };
            let Ok(given) = STANDARD.decode(encoded) else {
                return false;
            };
            self.mac(id, timestamp, body).verify_slice(&given).is_ok()
        })
    }
}

/// The `webhook-signature` header of one attempt signed with every key of `keys`, in
/// order and space-separated (`v1,<new> v1,<old>` while a rotation overlaps): a
/// Standard Webhooks receiver accepts the message when any one of them verifies.
pub fn signature_header(keys: &[SigningKey], id: &str, timestamp: i64, body: &str) -> String {
    keys.iter()
        .map(|k| k.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Signs one attempt: the value of its `webhook-signature` header.
pub fn sign(secret: &str, id: &str, timestamp: i64, body: &str) -> Result<String, InvalidSecret> {
    Ok(SigningKey::parse(secret)?.sign(id, timestamp, body))
}

/// Checks a `webhook-signature` header the way a Standard Webhooks receiver does (without
/// the timestamp tolerance).
pub fn verify(secret: &str, id: &str, timestamp: i64, body: &str, header: &str) -> bool {
    SigningKey::parse(secret).is_ok_and(|key| key.verify(id, timestamp, body, header))
}

#[cfg(test)]
mod tests {
    use super::*;

    // The test vector of the reference standardwebhooks libraries.
    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const TS: i64 = 1_614_265_330;
    const BODY: &str = r#"{"test": 2432232314}"#;
    const EXPECTED: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    #[test]
    fn matches_the_reference_vector() {
        assert_eq!(sign(SECRET, ID, TS, BODY).unwrap(), EXPECTED);
    }

    #[test]
    fn prefix_is_optional() {
        let bare = SECRET.strip_prefix(SECRET_PREFIX).unwrap();
        assert_eq!(sign(bare, ID, TS, BODY).unwrap(), EXPECTED);
    }

    #[test]
    fn verifies_the_reference_vector_among_others() {
        assert!(verify(SECRET, ID, TS, BODY, EXPECTED));
        let several = format!("v1,bm9wZQ== {EXPECTED} v2,abc");
        assert!(verify(SECRET, ID, TS, BODY, &several));
    }

    #[test]
    fn refuses_any_change() {
        assert!(!verify(SECRET, ID, TS + 1, BODY, EXPECTED));
        assert!(!verify(SECRET, "msg_other", TS, BODY, EXPECTED));
        assert!(!verify(SECRET, ID, TS, r#"{"test": 2432232315}"#, EXPECTED));
        assert!(!verify(
            "whsec_c2VjcmV0LWtleS1vdGhlcg==",
            ID,
            TS,
            BODY,
            EXPECTED
        ));
        assert!(!verify(
            SECRET,
            ID,
            TS,
            BODY,
            "v2,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        ));
        assert!(!verify(SECRET, ID, TS, BODY, "v1,not base64"));
        assert!(!verify(SECRET, ID, TS, BODY, ""));
    }

    #[test]
    fn several_keys_sign_in_order_and_each_verifies() {
        let other = "whsec_c2VjcmV0LWtleS1vdGhlcg==";
        let keys = [
            SigningKey::parse(SECRET).unwrap(),
            SigningKey::parse(other).unwrap(),
        ];
        let header = signature_header(&keys, ID, TS, BODY);
        let (first, second) = header.split_once(' ').unwrap();
        assert_eq!(first, EXPECTED);
        assert_eq!(second, sign(other, ID, TS, BODY).unwrap());
        assert!(verify(SECRET, ID, TS, BODY, &header));
        assert!(verify(other, ID, TS, BODY, &header));
    }

    #[test]
    fn refuses_secrets_that_are_not_base64() {
        assert_eq!(sign("whsec_***", ID, TS, BODY), Err(InvalidSecret));
        assert_eq!(sign("whsec_", ID, TS, BODY), Err(InvalidSecret));
    }
}
