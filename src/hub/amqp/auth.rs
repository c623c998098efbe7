//! Who an AMQP connection is: the SASL exchange (ANONYMOUS or MSSBCBS, then claims through `$cbs`; or PLAIN
//! with a policy and a SharedAccessSignature, or a policy and its key) and the claims a
//! connection holds ("Control access to IoT Hub": AMQP; "AMQP 1.0 in Azure Service Bus and
//! Event Hubs protocol guide": claims-based authorization). A claim is a token's audience, the
//! policy's permissions and the token's expiry; links check them when they attach and while
//! they live. Errors name why, never the token.

use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use fe2o3_amqp::acceptor::SaslAcceptor;
use fe2o3_amqp::acceptor::sasl_acceptor::SaslServerFrame;
use fe2o3_amqp::types::primitives::{Array, Symbol};
use fe2o3_amqp::types::sasl::{SaslCode, SaslInit, SaslOutcome, SaslResponse};

use crate::hub::secrets::Permissions;
use crate::hub::state::{Hub, HubState};
use crate::iot::sas::{Key, SasError, SasToken, resource_covers};
use crate::iot::time::unix_secs;

/// What a connection may do on a resource, until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claim {
    /// `host/path`, scheme and port removed (what `iot::sas::resource_covers` compares).
    pub resource: String,
    pub permissions: Permissions,
    /// Unix seconds; `u64::MAX` for a key given over SASL PLAIN (it does not expire).
    pub expiry: u64,
}

/// Why a token was refused, as `$cbs` reports it (status 401, with this as the description).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is not a SharedAccessSignature")]
    Malformed,
    #[error("the token has expired")]
    Expired,
    #[error("the token's audience is not this hub")]
    WrongAudience,
    #[error("the token is not signed by a shared access policy of this hub")]
    InvalidSignature,
}

/// Strips `sb://`, `amqps://` or `amqp://` and a trailing `/` from an audience or address.
pub fn without_scheme(uri: &str) -> &str {
    let s = ["sb://", "amqps://", "amqp://"].iter().find_map(|p| uri.strip_prefix(p)).unwrap_or(uri);
    s.trim_end_matches('/')
}

/// Checks a SharedAccessSignature signed with a policy key (`skn` names the policy) and returns
/// the claim it grants: its audience must be one of this hub's names (with any path), it must be
/// unexpired within `behaviour.sas_skew_secs`.
pub fn verify_policy_token(hub: &HubState, token: &str, now: SystemTime) -> Result<Claim, TokenError> {
    let token = SasToken::parse(token).map_err(|_| TokenError::Malformed)?;
    let resource = without_scheme(&token.resource).to_owned();
    let host = resource.split('/').next().unwrap_or_default();
    if !hub.is_our_host(host) {
        return Err(TokenError::WrongAudience);
    }
    let policy = token.skn.as_deref().and_then(|n| hub.policy(n)).ok_or(TokenError::InvalidSignature)?;
    // IoT Hub signs with the key's decoded bytes; Event Hubs (and so every Event Hubs client
    // reading the compatible endpoint) with the key's base64 text as it stands ("Authenticate
    // access to Event Hubs resources using shared access signatures"). Both are the policy's key.
    let pair = &hub.secrets.policies[policy.name];
    let as_text = [&pair.primary, &pair.secondary].map(|t| Key::from_bytes(t.as_bytes().to_vec()));
    let keys = policy.keys.iter().chain(as_text.iter());
    // Coverage is checked per link against the claim; here the token need only cover itself.
    match token.verify(&token.resource, keys, unix_secs(now), hub.behaviour.sas_skew_secs) {
        Ok(()) => Ok(Claim { resource, permissions: policy.permissions, expiry: token.expiry }),
        Err(SasError::Expired) => Err(TokenError::Expired),
        Err(_) => Err(TokenError::InvalidSignature),
    }
}

/// The claims one connection holds, from SASL PLAIN and from every `$cbs` put-token.
#[derive(Debug, Default, Clone)]
pub struct Claims(Arc<Mutex<Vec<Claim>>>);

impl Claims {
    pub fn add(&self, claim: Claim) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // A refreshed token for the same audience replaces the old one; the list stays small.
        v.retain(|c| c.resource != claim.resource);
        if v.len() < 64 {
            v.push(claim);
        }
    }

    /// The latest expiry (Unix seconds) of an unexpired claim covering `host/path` with
    /// `needed`, or `None` when no claim authorizes it now. Entity paths compare without case,
    /// as Event Hubs names do (the Python client's audience says `consumergroups`, its link
    /// address `ConsumerGroups`).
    pub fn authorizes(&self, resource: &str, needed: Permissions, now_unix: u64) -> Option<u64> {
        let resource = resource.to_ascii_lowercase();
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        v.iter()
            .filter(|c| c.permissions.contains(needed) && c.expiry >= now_unix)
            .filter(|c| resource_covers(&c.resource.to_ascii_lowercase(), &resource))
            .map(|c| c.expiry)
            .max()
    }
}

/// The listener's SASL side: offers MSSBCBS, PLAIN and ANONYMOUS as IoT Hub and Event Hubs do. PLAIN
/// takes `{policy}@sas.root.{hub}` with a SharedAccessSignature as the password (IoT Hub), or a
/// policy name with that policy's key (Event Hubs); what it grants lands in `claims`.
/// ANONYMOUS and MSSBCBS grant nothing: the client puts a token on `$cbs` before attaching.
#[derive(Clone)]
pub struct HubSasl {
    hub: Hub,
    claims: Claims,
}

impl HubSasl {
    pub fn new(hub: Hub, claims: Claims) -> Self {
        HubSasl { hub, claims }
    }

    fn plain(&self, response: &[u8]) -> SaslCode {
        let mut parts = response.split(|b| *b == 0);
        let (Some(_authzid), Some(user), Some(password), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return SaslCode::Auth;
        };
        let (Ok(user), Ok(password)) = (std::str::from_utf8(user), std::str::from_utf8(password)) else {
            return SaslCode::Auth;
        };
        let now = crate::hub::clock::wall();
        if password.starts_with("SharedAccessSignature ") {
            let policy = user.split('@').next().unwrap_or_default();
            return match verify_policy_token(&self.hub, password, now) {
                Ok(claim) if policy.eq_ignore_ascii_case(&self.policy_of(password)) => {
                    self.claims.add(claim);
                    SaslCode::Ok
                }
                _ => SaslCode::Auth,
            };
        }
        // Event Hubs style: the policy name and its key, for the whole hub.
        let Some(policy) = self.hub.policy(user) else { return SaslCode::Auth };
        let key_ok = policy.keys.iter().any(|k| {
            use subtle::ConstantTimeEq;
            bool::from(k.to_base64().as_bytes().ct_eq(password.as_bytes()))
        });
        if !key_ok {
            return SaslCode::Auth;
        }
        self.claims.add(Claim {
            resource: self.hub.hostname.clone(),
            permissions: policy.permissions,
            expiry: u64::MAX,
        });
        SaslCode::Ok
    }

    fn policy_of(&self, token: &str) -> String {
        SasToken::parse(token).ok().and_then(|t| t.skn).unwrap_or_default()
    }
}

const PLAIN: &str = "PLAIN";
const ANONYMOUS: &str = "ANONYMOUS";
/// Microsoft's mechanism for "claims come later, on `$cbs`", which Azure's brokers offer and the
/// uamqp-based clients (azure-iot-hub's C2D sender) insist on; it carries nothing.
const MSSBCBS: &str = "MSSBCBS";

impl SaslAcceptor for HubSasl {
    fn mechanisms(&self) -> Array<Symbol> {
        Array::from(vec![Symbol::from(MSSBCBS), Symbol::from(PLAIN), Symbol::from(ANONYMOUS)])
    }

    fn on_init(&mut self, init: SaslInit) -> SaslServerFrame {
        let code = match init.mechanism.as_str() {
            ANONYMOUS | MSSBCBS => SaslCode::Ok,
            PLAIN => match init.initial_response {
                Some(r) => self.plain(r.as_ref()),
                None => SaslCode::Auth,
            },
            _ => SaslCode::Auth,
        };
        SaslServerFrame::Outcome(SaslOutcome { code, additional_data: None })
    }

    fn on_response(&mut self, _response: SaslResponse) -> SaslServerFrame {
        // Neither mechanism has a challenge, so a response is out of order.
        SaslServerFrame::Outcome(SaslOutcome { code: SaslCode::Auth, additional_data: None })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::testing::bench;
    use crate::iot::sas::{Key, sign_token};

    fn policy_token(hub: &HubState, name: &str, audience: &str, ttl: i64) -> String {
        let k = Key::from_base64(&hub.secrets.policies[name].primary).unwrap();
        let now = unix_secs(crate::hub::clock::wall()) as i64;
        sign_token(audience, &k, (now + ttl).max(0) as u64, Some(name))
    }

    #[tokio::test(start_paused = true)]
    async fn policy_tokens_grant_their_audience_until_they_expire() {
        let b = bench(|_| {});
        let now = crate::hub::clock::wall();
        let t = policy_token(&b.hub, "service", "sb://localhost/localhost", 60);
        let claim = verify_policy_token(&b.hub, &t, now).unwrap();
        assert_eq!(claim.resource, "localhost/localhost");
        assert!(claim.permissions.contains(Permissions::SERVICE_CONNECT));
        let claims = Claims::default();
        claims.add(claim);
        let (read, n) = (Permissions::SERVICE_CONNECT, unix_secs(now));
        assert!(claims.authorizes("localhost/localhost/ConsumerGroups/$Default/Partitions/0", read, n).is_some());
        assert!(claims.authorizes("localhost/other", read, n).is_none(), "another entity");
        assert!(claims.authorizes("LOCALHOST/Localhost/x", read, n).is_some(), "names compare without case");
        assert!(claims.authorizes("localhost/localhost", read, n + 61).is_none(), "expired");
        assert_eq!(
            verify_policy_token(&b.hub, &policy_token(&b.hub, "service", "sb://elsewhere/x", 60), now),
            Err(TokenError::WrongAudience)
        );
        assert_eq!(
            verify_policy_token(&b.hub, &policy_token(&b.hub, "service", "sb://localhost/x", -10), now),
            Err(TokenError::Expired)
        );
        let text_key = Key::from_bytes(b.hub.secrets.policies["service"].primary.as_bytes().to_vec());
        let eh_style = sign_token("sb://localhost/localhost", &text_key, n + 60, Some("service"));
        assert!(
            verify_policy_token(&b.hub, &eh_style, now).is_ok(),
            "signed with the key text, as Event Hubs clients do"
        );
        let forged = t.replace("skn=service", "skn=iothubowner");
        assert_eq!(verify_policy_token(&b.hub, &forged, now), Err(TokenError::InvalidSignature));
        assert_eq!(verify_policy_token(&b.hub, "nonsense", now), Err(TokenError::Malformed));
    }

    #[tokio::test(start_paused = true)]
    async fn sasl_plain_takes_a_token_or_a_policy_key() {
        let b = bench(|_| {});
        let claims = Claims::default();
        let sasl = HubSasl::new(b.hub.clone(), claims.clone());
        let plain = |user: &str, pass: &str| sasl.plain(format!("\0{user}\0{pass}").as_bytes());
        let t = policy_token(&b.hub, "service", "localhost", 60);
        assert_eq!(plain("service@sas.root.localhost", &t), SaslCode::Ok);
        assert_eq!(plain("iothubowner@sas.root.localhost", &t), SaslCode::Auth, "the user names another policy");
        assert_eq!(plain("service", &b.hub.secrets.policies["service"].primary), SaslCode::Ok);
        assert_eq!(plain("service", "d3Jvbmc="), SaslCode::Auth);
        assert_eq!(plain("nobody", "x"), SaslCode::Auth);
        assert_eq!(sasl.plain(b"no separators"), SaslCode::Auth);
        let n = unix_secs(crate::hub::clock::wall());
        assert!(claims.authorizes("localhost/anything", Permissions::SERVICE_CONNECT, n).is_some());
    }
}
