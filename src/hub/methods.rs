//! Direct methods (protocol.md §4.8, §6.5): a service call waits up to `connectTimeoutInSeconds`
//! for the identity to be connected and subscribed, publishes the request with a fresh `$rid`, and
//! waits up to `responseTimeoutInSeconds` for the device's answer on that rid.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use rumqttc::mqttbytes::QoS;
use tokio::sync::oneshot;

use super::registry::Identity;
use super::session::Outbound;
use crate::iot::topic;

/// What the device answered.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResponse {
    pub status: u16,
    pub payload: Bytes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MethodError {
    /// Not connected, or not subscribed to methods, for the whole connect wait.
    NotOnline { waited: Duration },
    /// Published, but no answer in time.
    Timeout,
}

struct Pending {
    identity: String,
    tx: oneshot::Sender<MethodResponse>,
}

#[derive(Default)]
pub struct Methods {
    pending: Mutex<HashMap<String, Pending>>,
    next_rid: AtomicU64,
}

/// Removes a pending call however `invoke` ends (answer, timeout, or the caller going away).
struct Cleanup<'a> {
    methods: &'a Methods,
    rid: String,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        self.methods.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&self.rid);
    }
}

impl Methods {
    pub async fn invoke(
        &self,
        identity: &Identity,
        name: &str,
        payload: Bytes,
        connect_timeout: Duration,
        response_timeout: Duration,
        deliver: bool,
    ) -> Result<MethodResponse, MethodError> {
        let rid = format!("{:x}", self.next_rid.fetch_add(1, Ordering::Relaxed) + 1);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rid.clone(), Pending { identity: identity.key(), tx });
        let _cleanup = Cleanup { methods: self, rid: rid.clone() };
        let deadline = crate::hub::clock::now() + connect_timeout;
        let topic = topic::method_request(name, &rid);
        loop {
            // Register interest before looking, so a subscription made in between is not missed.
            let notified = identity.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = identity.lock();
                if let Some(s) = st.session.as_ref().filter(|_| !st.removed)
                    && s.subs.methods.is_some()
                    // An injected drop: the device looks online, the request never reaches it.
                    && (!deliver
                        || s.send(Outbound::Publish {
                        topic: topic.clone(),
                        payload: payload.clone(),
                        qos: QoS::AtMostOnce,
                        c2d_id: None,
                    }))
                {
                    break;
                }
            }
            if crate::hub::clock::now() >= deadline {
                return Err(MethodError::NotOnline { waited: connect_timeout });
            }
            let _ = tokio::time::timeout_at(deadline, notified).await;
        }
        match tokio::time::timeout(response_timeout, rx).await {
            Ok(Ok(resp)) => Ok(resp),
            _ => Err(MethodError::Timeout),
        }
    }

    /// A device answered `rid`. Only the identity the request went to can complete it.
    pub fn complete(&self, identity_key: &str, rid: &str, resp: MethodResponse) -> bool {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        match pending.get(rid) {
            Some(p) if p.identity == identity_key => {
                let p = pending.remove(rid).expect("just found");
                p.tx.send(resp).is_ok()
            }
            _ => false,
        }
    }
}
