//! JWT parsing: arbitrary tokens, and arbitrary claims under a valid HS256 signature (so the
//! claims decoding and checks are reached, not only the signature check).
#![no_main]

use std::sync::OnceLock;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use confab_gateway::auth::Authenticator;
use jsonwebtoken::{Algorithm, EncodingKey};
use libfuzzer_sys::fuzz_target;

const SECRET: &[u8] = b"fuzz-secret-fuzz-secret-fuzz-secret!";

fn auth() -> &'static Authenticator {
    static AUTH: OnceLock<Authenticator> = OnceLock::new();
    AUTH.get_or_init(|| Authenticator::with_secret(SECRET).expect("a long enough secret"))
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let token = if mode % 2 == 0 {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        // rest = header JSON, 0xff, claims JSON: signed, so verification reaches the claims.
        let (header, claims) = match rest.iter().position(|&b| b == 0xff) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (&br#"{"alg":"HS256","typ":"JWT"}"#[..], rest),
        };
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let key = EncodingKey::from_secret(SECRET);
        let Ok(signature) = jsonwebtoken::crypto::sign(message.as_bytes(), &key, Algorithm::HS256)
        else {
            return;
        };
        format!("{message}.{signature}")
    };
    if let Ok(who) = auth().verify(&token) {
        // What a verified identity promises the rest of the gateway.
        assert!(!who.user_id.is_empty() && who.user_id.len() <= 200);
        assert!(!who.user_id.chars().any(char::is_control));
        assert!(who.name.len() <= 200 && !who.name.chars().any(char::is_control));
    }
});
