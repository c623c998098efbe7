//! Shared Access Signature tokens (protocol.md §1): signing, parsing, verification, and the
//! DPS group-enrollment key derivation (§3.2).
//!
//! Verification signs the `sr` text *exactly as received*: clients disagree on escape case and on
//! whether `sr` is encoded at all, and each signs what it sends.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::encoding::{url_decode, url_encode};

type HmacSha256 = Hmac<Sha256>;

/// A decoded symmetric key. Its `Debug` never shows the bytes, so a key cannot leak through a log
/// line that formats a struct holding it.
#[derive(Clone, PartialEq, Eq)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(<redacted>)")
    }
}

/// A key that is not valid base64. The offending text is deliberately not included.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the key is not valid base64")]
pub struct BadKey;

impl Key {
    pub fn from_base64(text: &str) -> Result<Key, BadKey> {
        let bytes = B64.decode(text.trim()).map_err(|_| BadKey)?;
        if bytes.is_empty() {
            return Err(BadKey);
        }
        Ok(Key(bytes))
    }

    pub fn from_bytes(bytes: Vec<u8>) -> Key {
        Key(bytes)
    }

    /// A fresh random 32-byte key, as IoT Hub generates for new identities.
    pub fn generate() -> Key {
        Key(rand::random::<[u8; 32]>().to_vec())
    }

    pub fn to_base64(&self) -> String {
        B64.encode(&self.0)
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC accepts keys of any length")
    }

    /// base64(HMAC-SHA256(key, message)).
    pub fn sign(&self, message: &[u8]) -> String {
        let mut mac = self.mac();
        mac.update(message);
        B64.encode(mac.finalize().into_bytes())
    }

    /// Constant-time check of a raw signature against HMAC-SHA256(key, message).
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let mut mac = self.mac();
        mac.update(message);
        mac.verify_slice(signature).is_ok()
    }
}

/// The device key of a symmetric-key group enrollment member:
/// base64(HMAC-SHA256(group key, registration id)).
pub fn derive_device_key(group_key: &Key, registration_id: &str) -> Key {
    let mut mac = group_key.mac();
    mac.update(registration_id.as_bytes());
    Key(mac.finalize().into_bytes().to_vec())
}

/// Builds `SharedAccessSignature sr=..&sig=..&se=..[&skn=..]` for a resource URI (given
/// unencoded; it is encoded with upper-case escapes like the SDKs do).
pub fn sign_token(resource_uri: &str, key: &Key, expiry: u64, policy: Option<&str>) -> String {
    let sr = url_encode(resource_uri);
    let sig = key.sign(format!("{sr}\n{expiry}").as_bytes());
    let mut token = format!("SharedAccessSignature sr={sr}&sig={}&se={expiry}", url_encode(&sig));
    if let Some(p) = policy {
        token.push_str("&skn=");
        token.push_str(&url_encode(p));
    }
    token
}

/// Why a token was refused. Messages never contain the token or the signature.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SasError {
    #[error("not a SharedAccessSignature token")]
    NotSas,
    #[error("the token has no `{0}` field")]
    Missing(&'static str),
    #[error("the token's `{0}` field appears twice")]
    Duplicate(&'static str),
    #[error("the token's `{0}` field is badly encoded")]
    BadEncoding(&'static str),
    #[error("the token's expiry `se` is not a whole number of seconds")]
    BadExpiry,
    #[error("the token expired")]
    Expired,
    #[error("the token's resource does not cover this identity")]
    WrongResource,
    #[error("the token's signature does not match")]
    BadSignature,
}

/// A parsed token. `sr_raw` and `se_raw` keep the received text because that is what was signed.
#[derive(Clone, PartialEq, Eq)]
pub struct SasToken {
    pub sr_raw: String,
    /// `sr` percent-decoded: the resource this token grants.
    pub resource: String,
    pub se_raw: String,
    pub expiry: u64,
    signature: Vec<u8>,
    /// The policy (key name) when signed by a shared access policy key.
    pub skn: Option<String>,
}

impl std::fmt::Debug for SasToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SasToken")
            .field("resource", &self.resource)
            .field("expiry", &self.expiry)
            .field("skn", &self.skn)
            .finish_non_exhaustive()
    }
}

impl SasToken {
    /// Parses a token; field order is free and `skn` optional (§1.1).
    pub fn parse(token: &str) -> Result<SasToken, SasError> {
        let rest = token.trim().strip_prefix("SharedAccessSignature ").ok_or(SasError::NotSas)?;
        let (mut sr, mut sig, mut se, mut skn) = (None, None, None, None);
        for item in rest.split('&').filter(|s| !s.is_empty()) {
            let (k, v) = item.split_once('=').unwrap_or((item, ""));
            let (slot, name) = match k {
                "sr" => (&mut sr, "sr"),
                "sig" => (&mut sig, "sig"),
                "se" => (&mut se, "se"),
                "skn" => (&mut skn, "skn"),
                _ => continue,
            };
            if slot.replace(v).is_some() {
                return Err(SasError::Duplicate(name));
            }
        }
        let sr_raw = sr.ok_or(SasError::Missing("sr"))?;
        let sig = sig.ok_or(SasError::Missing("sig"))?;
        let se_raw = se.ok_or(SasError::Missing("se"))?;
        let resource = url_decode(sr_raw).map_err(|_| SasError::BadEncoding("sr"))?;
        let sig_b64 = url_decode(sig).map_err(|_| SasError::BadEncoding("sig"))?;
        let signature = B64.decode(sig_b64).map_err(|_| SasError::BadEncoding("sig"))?;
        let expiry = se_raw.parse::<u64>().map_err(|_| SasError::BadExpiry)?;
        let skn = match skn {
            Some(s) => Some(url_decode(s).map_err(|_| SasError::BadEncoding("skn"))?),
            None => None,
        };
        Ok(SasToken { sr_raw: sr_raw.to_owned(), resource, se_raw: se_raw.to_owned(), expiry, signature, skn })
    }

    /// True once `now` is past the expiry plus the allowed clock skew.
    pub fn is_expired(&self, now_unix: u64, skew_secs: u64) -> bool {
        now_unix > self.expiry.saturating_add(skew_secs)
    }

    /// Checks the signature against one key: HMAC over the received `sr` + `\n` + received `se`.
    pub fn signed_by(&self, key: &Key) -> bool {
        key.verify(format!("{}\n{}", self.sr_raw, self.se_raw).as_bytes(), &self.signature)
    }

    /// Full check for a resource: expiry, coverage, then each candidate key in turn.
    pub fn verify<'k>(
        &self,
        requested_resource: &str,
        keys: impl IntoIterator<Item = &'k Key>,
        now_unix: u64,
        skew_secs: u64,
    ) -> Result<(), SasError> {
        if self.is_expired(now_unix, skew_secs) {
            return Err(SasError::Expired);
        }
        if !resource_covers(&self.resource, requested_resource) {
            return Err(SasError::WrongResource);
        }
        if keys.into_iter().any(|k| self.signed_by(k)) { Ok(()) } else { Err(SasError::BadSignature) }
    }
}

/// Whether a token for `granted` authorises `requested`: a prefix by whole path segments, the
/// host (first segment) compared case-insensitively and any `:port` on it ignored, the rest exactly.
pub fn resource_covers(granted: &str, requested: &str) -> bool {
    let granted = granted.trim_end_matches('/');
    let (g_host, g_path) = split_host(granted);
    let (r_host, r_path) = split_host(requested);
    if !strip_port(g_host).eq_ignore_ascii_case(strip_port(r_host)) {
        return false;
    }
    match g_path {
        None => true,
        Some(g) => match r_path {
            Some(r) => r == g || (r.starts_with(g) && r.as_bytes()[g.len()] == b'/'),
            None => false,
        },
    }
}

fn split_host(uri: &str) -> (&str, Option<&str>) {
    match uri.split_once('/') {
        Some((h, p)) => (h, Some(p)),
        None => (uri, None),
    }
}

fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GROUP_KEY: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8gISIjJCUmJygpKissLS4vMDEyMzQ1Njc4OTo7PD0+Pw==";
    const DERIVED: &str = "2j/XVTSoVdXNxVRDRVzfxVzPbdGKpx9AKfWC36EL+uM=";

    fn derived() -> Key {
        Key::from_base64(DERIVED).unwrap()
    }

    #[test]
    fn derives_the_group_member_key() {
        let group = Key::from_base64(GROUP_KEY).unwrap();
        assert_eq!(derive_device_key(&group, "sim-device-0001").to_base64(), DERIVED);
    }

    #[test]
    fn signs_the_reference_vectors() {
        assert_eq!(
            sign_token("0ne00000A0A/registrations/sim-device-0001", &derived(), 1_700_000_000, Some("registration")),
            "SharedAccessSignature sr=0ne00000A0A%2Fregistrations%2Fsim-device-0001&sig=BalTrrhZp5OYKrJNVWPF9BaoZMgiQ2x0Evv8SeiIUi0%3D&se=1700000000&skn=registration"
        );
        assert_eq!(
            sign_token("myhub.azure-devices.net/devices/sim-device-0001", &derived(), 1_700_000_000, None),
            "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fsim-device-0001&sig=yV1T67CHDMi65HcXky6eAhd5GblgJhOhMBf5EzlWjY4%3D&se=1700000000"
        );
        assert_eq!(
            derived().sign(b"myhub.azure-devices.net%2Fdevices%2Fsim-device-0001%2Fmodules%2Fmod1\n1700000000"),
            "XejbFlaso850XeGe+VITKaIkn6+CnboI+AhGXhjuMY0="
        );
        let group = Key::from_base64(GROUP_KEY).unwrap();
        assert_eq!(
            sign_token("myhub.azure-devices.net", &group, 1_700_000_000, Some("iothubowner")),
            "SharedAccessSignature sr=myhub.azure-devices.net&sig=pjFwdDI4JmqqN7la0stk0kQgQ1rplmCzW%2B0i7QH4ftE%3D&se=1700000000&skn=iothubowner"
        );
    }

    #[test]
    fn verifies_over_sr_as_received() {
        // Lower-case escapes sign differently; a verifier that re-encoded would reject this.
        let lower = "SharedAccessSignature se=1700000000&sig=3yVPaQ9z2EVeh6Z0PjzdU8bd0bC9MY2fyosivbypcok%3D&sr=myhub.azure-devices.net%2fdevices%2fsim-device-0001";
        let t = SasToken::parse(lower).unwrap();
        assert_eq!(t.resource, "myhub.azure-devices.net/devices/sim-device-0001");
        assert!(t.verify("myhub.azure-devices.net/devices/sim-device-0001", [&derived()], 1_699_999_999, 0).is_ok());
        // Node sends the DPS sr unencoded with fields in another order.
        let sr = "0ne00000A0A/registrations/sim-device-0001";
        let sig = derived().sign(format!("{sr}\n1700000000").as_bytes());
        let node = format!("SharedAccessSignature sr={sr}&sig={}&skn=registration&se=1700000000", url_encode(&sig));
        let t = SasToken::parse(&node).unwrap();
        assert_eq!(t.skn.as_deref(), Some("registration"));
        assert!(t.verify(sr, [&derived()], 1_600_000_000, 0).is_ok());
    }

    #[test]
    fn accepts_an_unescaped_slash_in_sig() {
        // hub-python quotes the signature with `/` kept.
        let key = Key::from_base64(GROUP_KEY).unwrap();
        for se in 1_700_000_000u64..1_700_000_200 {
            let sig = key.sign(format!("h\n{se}").as_bytes());
            if sig.contains('/') && sig.contains('+') {
                let raw = format!("SharedAccessSignature sr=h&sig={}&se={se}&skn=p", sig.replace('=', "%3D"));
                assert!(SasToken::parse(&raw).unwrap().verify("h", [&key], 0, 0).is_ok());
                return;
            }
        }
        panic!("no signature with both / and + in range");
    }

    #[test]
    fn refuses_bad_tokens() {
        let good = sign_token("h/devices/d", &derived(), 100, None);
        let t = SasToken::parse(&good).unwrap();
        assert_eq!(t.verify("h/devices/d", [&derived()], 101, 0), Err(SasError::Expired));
        assert!(t.verify("h/devices/d", [&derived()], 101, 5).is_ok());
        assert_eq!(t.verify("h/devices/e", [&derived()], 0, 0), Err(SasError::WrongResource));
        let other = Key::generate();
        assert_eq!(t.verify("h/devices/d", [&other], 0, 0), Err(SasError::BadSignature));
        assert_eq!(SasToken::parse("Bearer x").unwrap_err(), SasError::NotSas);
        assert_eq!(SasToken::parse("SharedAccessSignature sr=a&se=1").unwrap_err(), SasError::Missing("sig"));
        assert_eq!(SasToken::parse("SharedAccessSignature sr=a&sig=AA%3D%3D&se=x").unwrap_err(), SasError::BadExpiry);
        assert_eq!(
            SasToken::parse("SharedAccessSignature sr=a&sr=b&sig=AA%3D%3D&se=1").unwrap_err(),
            SasError::Duplicate("sr")
        );
    }

    #[test]
    fn resource_prefix_is_by_segment() {
        assert!(resource_covers("Hub.Example/devices/a", "hub.example/devices/a/modules/m"));
        assert!(resource_covers("hub.example", "hub.example/devices/a"));
        assert!(resource_covers("localhost:8443", "localhost"));
        assert!(!resource_covers("hub.example/devices/a", "hub.example/devices/ab"));
        assert!(!resource_covers("hub.example/devices/a", "hub.example"));
        assert!(!resource_covers("hub.example/devices/A", "hub.example/devices/a"));
        assert!(!resource_covers("other", "hub.example"));
    }

    #[test]
    fn debug_output_hides_secrets() {
        let t = SasToken::parse(&sign_token("h/devices/d", &derived(), 100, None)).unwrap();
        let shown = format!("{t:?} {:?}", derived());
        assert!(!shown.contains("sig") && !shown.contains(DERIVED) && !shown.contains("2j/X"));
    }
}
