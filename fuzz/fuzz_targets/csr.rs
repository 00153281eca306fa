//! A certificate signing request as a device sends it during onboarding (PEM text, hostile).
//! The first byte picks the shape: even = the rest is DER, wrapped in PEM here (so mutations
//! reach the ASN.1 parser instead of breaking the base64), odd = the rest is the PEM text.
#![no_main]

use base64::Engine as _;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let Some((&shape, rest)) = bytes.split_first() else { return };
    let pem = if shape % 2 == 0 {
        let encoded = base64::engine::general_purpose::STANDARD.encode(rest);
        format!("-----BEGIN CERTIFICATE REQUEST-----\n{encoded}\n-----END CERTIFICATE REQUEST-----\n")
    } else {
        match std::str::from_utf8(rest) {
            Ok(text) => text.to_string(),
            Err(_) => return,
        }
    };
    let _ = fleet::CsrSigner::check(&pem, "cam-01");
});
