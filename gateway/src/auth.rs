//! JWT verification (HS256 secret or RS256 public key) and minting of tokens with the secret.

use chrono::Utc;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::chat::model::Identity;

#[derive(Debug, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub departments: Vec<String>,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Not before: a token is refused until then (with [`NBF_LEEWAY_SECONDS`] for clock skew).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
}

/// Clock skew allowed on `nbf` between the token's issuer and this gateway.
pub const NBF_LEEWAY_SECONDS: i64 = 30;

/// Why a token was refused; the `reason` is safe to show the client and to use as a metric label.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token signature")]
    BadSignature,
    #[error("malformed token")]
    Malformed,
    #[error("token not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("invalid token claims: {0}")]
    Claims(&'static str),
}

impl AuthError {
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Expired => "expired",
            Self::BadSignature => "bad_signature",
            Self::Malformed => "malformed",
            Self::NotYetValid => "not_yet_valid",
            Self::Claims(_) => "claims",
        }
    }
}

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("CONFAB_JWT_PUBLIC_KEY is not an RSA public key in PEM form: {0}")]
    PublicKey(jsonwebtoken::errors::Error),
    #[error("CONFAB_JWT_SECRET must be at least 32 bytes (got {0})")]
    ShortSecret(usize),
}

/// Checks tokens; can also mint them when it holds a shared secret.
pub struct Authenticator {
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    validation: Validation,
}

impl Authenticator {
    pub fn with_secret(secret: &[u8]) -> Result<Self, KeyError> {
        if secret.len() < 32 {
            return Err(KeyError::ShortSecret(secret.len()));
        }
        Ok(Self {
            decoding: DecodingKey::from_secret(secret),
            encoding: Some(EncodingKey::from_secret(secret)),
            validation: Self::validation(Algorithm::HS256),
        })
    }

    pub fn with_public_key(pem: &[u8]) -> Result<Self, KeyError> {
        Ok(Self {
            decoding: DecodingKey::from_rsa_pem(pem).map_err(KeyError::PublicKey)?,
            encoding: None,
            validation: Self::validation(Algorithm::RS256),
        })
    }

    fn validation(alg: Algorithm) -> Validation {
        let mut v = Validation::new(alg);
        v.leeway = 0;
        v.validate_exp = true;
        // `nbf` is checked in `verify` with its own leeway: `leeway` here would also stretch `exp`.
        v.validate_nbf = false;
        v.set_required_spec_claims(&["exp", "sub"]);
        v
    }

    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature | ErrorKind::InvalidAlgorithm => {
                    AuthError::BadSignature
                }
                ErrorKind::MissingRequiredClaim(_) => AuthError::Claims("sub and exp are required"),
                _ => AuthError::Malformed,
            })?;
        let c = data.claims;
        if c.nbf
            .is_some_and(|nbf| nbf > Utc::now().timestamp() + NBF_LEEWAY_SECONDS)
        {
            return Err(AuthError::NotYetValid);
        }
        if c.sub.is_empty() || c.sub.len() > 200 || c.sub.chars().any(char::is_control) {
            return Err(AuthError::Claims("sub must be 1-200 printable characters"));
        }
        let name = c.name.unwrap_or_else(|| c.sub.clone());
        if name.len() > 200 || name.chars().any(char::is_control) {
            return Err(AuthError::Claims(
                "name must be at most 200 printable characters",
            ));
        }
        Ok(Identity {
            user_id: c.sub,
            name,
            roles: c.roles,
            departments: c.departments,
            exp: c.exp,
        })
    }

    /// Signs a token, when this authenticator holds a secret.
    pub fn mint(
        &self,
        sub: &str,
        name: &str,
        roles: Vec<String>,
        departments: Vec<String>,
        ttl: chrono::Duration,
    ) -> Option<String> {
        let key = self.encoding.as_ref()?;
        let now = Utc::now().timestamp();
        let claims = Claims {
            sub: sub.to_owned(),
            name: Some(name.to_owned()),
            roles,
            departments,
            exp: now + ttl.num_seconds(),
            iat: Some(now),
            nbf: None,
        };
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, key).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";

    #[test]
    fn a_minted_token_verifies_to_its_identity() {
        let auth = Authenticator::with_secret(SECRET).expect("secret");
        let token = auth
            .mint(
                "alice",
                "Alice",
                vec!["agent".into()],
                vec!["d1".into()],
                chrono::Duration::hours(1),
            )
            .expect("mint");
        let who = auth.verify(&token).expect("verify");
        assert_eq!(who.user_id, "alice");
        assert_eq!(who.name, "Alice");
        assert!(who.is_agent());
        assert!(who.in_department("d1"));
    }

    #[test]
    fn expired_wrong_key_and_garbage_tokens_are_refused_with_their_reason() {
        let auth = Authenticator::with_secret(SECRET).expect("secret");
        let expired = auth
            .mint("a", "A", vec![], vec![], chrono::Duration::seconds(-10))
            .expect("mint");
        assert_eq!(auth.verify(&expired), Err(AuthError::Expired));
        let other =
            Authenticator::with_secret(b"another-secret-another-secret-xx").expect("secret");
        let foreign = other
            .mint("a", "A", vec![], vec![], chrono::Duration::hours(1))
            .expect("mint");
        assert_eq!(auth.verify(&foreign), Err(AuthError::BadSignature));
        assert_eq!(auth.verify("not.a.jwt"), Err(AuthError::Malformed));
        assert_eq!(auth.verify(""), Err(AuthError::Missing));
    }

    #[test]
    fn rs256_tokens_verify_with_the_public_key_and_hs256_ones_are_refused() {
        // A key pair made for these tests only (tests/fixtures), never used anywhere else.
        let private = include_bytes!("../tests/fixtures/rs256-test-private.pem");
        let public = include_bytes!("../tests/fixtures/rs256-test-public.pem");
        let auth = Authenticator::with_public_key(public).expect("public key");
        let claims = Claims {
            sub: "rsa-user".into(),
            name: Some("RSA".into()),
            roles: vec!["admin".into()],
            departments: vec![],
            exp: Utc::now().timestamp() + 600,
            iat: None,
            nbf: None,
        };
        let key = EncodingKey::from_rsa_pem(private).expect("private key");
        let token =
            jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key).expect("sign");
        let who = auth.verify(&token).expect("verifies");
        assert_eq!(who.user_id, "rsa-user");
        assert!(who.is_admin());
        // An HS256 token must not pass as RS256 (algorithm confusion).
        let hs = Authenticator::with_secret(SECRET)
            .expect("secret")
            .mint("rsa-user", "x", vec![], vec![], chrono::Duration::hours(1))
            .expect("mint");
        assert_eq!(auth.verify(&hs), Err(AuthError::BadSignature));
        assert!(
            auth.mint("a", "b", vec![], vec![], chrono::Duration::hours(1))
                .is_none(),
            "no minting with a public key"
        );
        assert!(Authenticator::with_public_key(b"not a pem").is_err());
    }

    fn signed(claims: &serde_json::Value) -> String {
        let key = EncodingKey::from_secret(SECRET);
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), claims, &key).expect("sign")
    }

    #[test]
    fn a_token_whose_nbf_is_ahead_is_refused_until_then_within_a_small_leeway() {
        let auth = Authenticator::with_secret(SECRET).expect("secret");
        let now = Utc::now().timestamp();
        let claims = |nbf: i64| serde_json::json!({"sub": "a", "exp": now + 7200, "nbf": nbf});
        assert_eq!(
            auth.verify(&signed(&claims(now + 3600))),
            Err(AuthError::NotYetValid),
            "a token valid one hour from now"
        );
        assert_eq!(AuthError::NotYetValid.reason(), "not_yet_valid");
        assert_eq!(
            auth.verify(&signed(&claims(now + NBF_LEEWAY_SECONDS + 5))),
            Err(AuthError::NotYetValid),
            "just past the leeway"
        );
        let skewed = auth
            .verify(&signed(&claims(now + NBF_LEEWAY_SECONDS - 5)))
            .expect("an issuer a few seconds ahead is within the leeway");
        assert_eq!(skewed.user_id, "a");
        auth.verify(&signed(&claims(now - 60)))
            .expect("an nbf in the past is fine");
        // `exp` keeps no leeway: the nbf leeway does not stretch it.
        let expired = serde_json::json!({"sub": "a", "exp": now - 2});
        assert_eq!(auth.verify(&signed(&expired)), Err(AuthError::Expired));
    }

    #[test]
    fn short_secrets_are_refused_at_start_up() {
        assert!(matches!(
            Authenticator::with_secret(b"short"),
            Err(KeyError::ShortSecret(5))
        ));
    }
}
