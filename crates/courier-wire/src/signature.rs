//! HMAC-SHA256 signatures of message bodies, with a key ID so keys can rotate.
//!
//! The header value is `<key-id>:<hex digest>`. Pure functions: the key comes
//! from the caller.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// A signing key and its ID.
#[derive(Clone)]
pub struct SigningKey {
    id: String,
    key: Vec<u8>,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({}, <redacted>)", self.id)
    }
}

/// Why a signature was refused. `kind` names what was signed (`task`, `result`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No signature header.
    #[error("the {kind} is not signed, and a signing key is set: every {kind} must be signed")]
    Missing { kind: &'static str },
    /// Not `<key-id>:<hex>`.
    #[error("the {kind} signature is malformed")]
    Malformed { kind: &'static str },
    /// Signed with a key this process does not have.
    #[error("the {kind} is signed with key \"{id}\", which is not the key set here")]
    UnknownKey { kind: &'static str, id: String },
    /// The digest does not match the body.
    #[error("the {kind} signature does not match its body (key \"{id}\")")]
    Mismatch { kind: &'static str, id: String },
}

impl SigningKey {
    /// A key with its ID.
    pub fn new(id: impl Into<String>, key: impl Into<Vec<u8>>) -> Self {
        Self {
            id: id.into(),
            key: key.into(),
        }
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length, so this cannot fail.
        HmacSha256::new_from_slice(&self.key).unwrap_or_else(|_| unreachable!("HMAC takes any key length"))
    }

    /// The header value for `body`.
    pub fn sign(&self, body: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(body);
        format!("{}:{}", self.id, hex::encode(mac.finalize().into_bytes()))
    }

    /// Check a header value against the body of a `kind` (`task`, `result`),
    /// in constant time.
    ///
    /// # Errors
    /// [`SignatureError`] saying what is wrong.
    pub fn verify(&self, kind: &'static str, body: &[u8], header: Option<&str>) -> Result<(), SignatureError> {
        let header = header.ok_or(SignatureError::Missing { kind })?;
        let (id, digest) = header.split_once(':').ok_or(SignatureError::Malformed { kind })?;
        if id != self.id {
            return Err(SignatureError::UnknownKey {
                kind,
                id: id.to_string(),
            });
        }
        let digest = hex::decode(digest).map_err(|_| SignatureError::Malformed { kind })?;
        let mut mac = self.mac();
        mac.update(body);
        mac.verify_slice(&digest).map_err(|_| SignatureError::Mismatch {
            kind,
            id: id.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_body_and_key() {
        let key = SigningKey::new("k1", b"secret".to_vec());
        let sig = key.sign(b"body");
        assert!(sig.starts_with("k1:") && sig.len() == 3 + 64);
        assert_eq!(key.verify("task", b"body", Some(&sig)), Ok(()));
        assert_eq!(
            key.verify("task", b"other", Some(&sig)),
            Err(SignatureError::Mismatch {
                kind: "task",
                id: "k1".into()
            })
        );
        let kind = "result";
        assert_eq!(key.verify(kind, b"body", None), Err(SignatureError::Missing { kind }));
        assert_eq!(
            key.verify(kind, b"body", Some("nonsense")),
            Err(SignatureError::Malformed { kind })
        );
        assert_eq!(
            key.verify(kind, b"body", Some("k1:zz")),
            Err(SignatureError::Malformed { kind })
        );
        let other = SigningKey::new("k2", b"secret".to_vec());
        assert_eq!(
            other.verify(kind, b"body", Some(&sig)),
            Err(SignatureError::UnknownKey { kind, id: "k1".into() })
        );
        let wrong = SigningKey::new("k1", b"guess".to_vec());
        assert_eq!(
            wrong.verify(kind, b"body", Some(&sig)),
            Err(SignatureError::Mismatch { kind, id: "k1".into() })
        );
        assert_eq!(format!("{key:?}"), "SigningKey(k1, <redacted>)");
    }
}
