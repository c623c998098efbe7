//! Transports under the device core: each link opens a connection for one identity, turns the
//! core's requests (`core::Sink`) into its protocol and what arrives into `core::Inbound`.
//! `mqtt` speaks MQTT over TLS or WebSockets; `https` speaks IoT Hub's device REST API. A new
//! transport is a new file here and an arm in `runtime::connect`; the core does not change.

pub mod https;
pub mod mqtt;

use std::future::Future;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::core::{Caps, End, Inbound, Sink};
use super::failures::{self, Failure};
use crate::client::https::HttpError;
use crate::client::mqtt::ConnectError;

/// Why a link stopped carrying.
#[derive(Debug)]
pub enum Closed {
    /// The connection failed; the label is the `cause` of `fleetsim_reconnects_total`.
    Lost(&'static str),
    /// The hub no longer accepts the identity's credentials.
    Refused(String),
}

impl From<Closed> for End {
    fn from(c: Closed) -> End {
        match c {
            Closed::Lost(cause) => End::Lost(cause),
            Closed::Refused(why) => End::Refused(why),
        }
    }
}

/// A connection the session loop drives (`runtime::session`). `Sink` queues; these do the I/O.
pub trait Link: Sink + Send {
    /// What the transport carries besides telemetry.
    fn caps(&self) -> Caps;

    /// Writes what is queued (MQTT), or starts sending it (HTTPS).
    fn flush(&mut self) -> impl Future<Output = Result<(), Closed>> + Send;

    /// The next thing from the hub. `None` when `deadline` passes or `cancel` fires first;
    /// keep-alive and polling happen in here.
    fn next(
        &mut self,
        deadline: Instant,
        cancel: &CancellationToken,
    ) -> impl Future<Output = Result<Option<Inbound>, Closed>> + Send;

    /// What has already arrived, without waiting.
    fn try_next(&mut self) -> Result<Option<Inbound>, Closed>;

    /// Ends the connection politely (MQTT DISCONNECT); errors no longer matter.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// Why a link could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Mqtt(#[from] ConnectError),
    #[error(transparent)]
    Https(#[from] HttpError),
    /// The HTTPS link's first poll took longer than `connect_timeout`.
    #[error("no answer in time")]
    Timeout,
}

impl OpenError {
    /// The `outcome` label of `fleetsim_connect_attempts_total`.
    pub fn outcome(&self) -> &'static str {
        match self {
            OpenError::Mqtt(ConnectError::Refused(_)) => "refused",
            OpenError::Mqtt(ConnectError::Timeout) | OpenError::Timeout => "timeout",
            OpenError::Mqtt(_) => "error",
            OpenError::Https(HttpError::Status { status: 401 | 403 | 404 | 429 | 503, .. }) => "refused",
            OpenError::Https(_) => "error",
        }
    }

    /// Classified for the operator; `at` is `host:port`.
    pub fn failure(&self, at: &str) -> Failure {
        let detail = format!("{at}: {}", crate::sys::error_chain(self));
        match self {
            OpenError::Mqtt(ConnectError::Refused(code)) => failures::connack(*code as u8, detail),
            OpenError::Mqtt(ConnectError::Timeout) | OpenError::Timeout => {
                failures::network(format!("{detail} (connect_timeout)"))
            }
            OpenError::Https(HttpError::Status { status, .. }) => failures::hub_status(*status, detail),
            _ => failures::network(detail),
        }
    }
}
