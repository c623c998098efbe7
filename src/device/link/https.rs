//! The HTTPS link: IoT Hub's device REST API (`client::https`). Telemetry is POSTed, what the
//! core queued since the last request going as one batch; a device polls for C2D messages every
//! `poll_interval` (at once again after a message, in case more wait) and completes each after
//! the core has handled it. No twins, desired patches or methods: IoT Hub has none over HTTPS.
//!
//! One request of each kind is in flight at a time; the requests are owned by the link, not by
//! `next`, so the session loop may stop waiting without losing an answer.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{Closed, Link};
use crate::client::https::{DeviceHttp, HttpError, Received};
use crate::device::core::{Caps, Inbound, Sink};
use crate::iot::property_bag::PropertyBag;

type Pending<T> = Option<Pin<Box<dyn Future<Output = T> + Send>>>;

pub struct HttpsLink {
    client: DeviceHttp,
    /// Devices poll for C2D messages; modules have none.
    poll: Option<Duration>,
    next_poll: Instant,
    /// Queued by the core, not yet sent: tag, properties, body.
    queued: Vec<(u16, PropertyBag, Bytes)>,
    next_tag: u16,
    sending: Pending<(Vec<u16>, Result<(), HttpError>)>,
    polling: Pending<Result<Received, HttpError>>,
    completing: Pending<Result<(), HttpError>>,
    /// Lock tokens of messages handed to the core, to complete.
    to_complete: VecDeque<String>,
    ready: VecDeque<Inbound>,
    closed: Option<Closed>,
}

impl HttpsLink {
    /// Opens the link for a device (which polls for C2D every `poll`) or a module (`poll` None).
    /// A device's first poll happens here, so a hub that refuses the credentials is known at
    /// once, as an MQTT CONNACK would tell it.
    pub async fn open(client: DeviceHttp, poll: Option<Duration>) -> Result<HttpsLink, HttpError> {
        let mut link = HttpsLink {
            client,
            poll,
            next_poll: Instant::now(),
            queued: Vec::new(),
            next_tag: 0,
            sending: None,
            polling: None,
            completing: None,
            to_complete: VecDeque::new(),
            ready: VecDeque::new(),
            closed: None,
        };
        if poll.is_some() {
            let first = link.client.receive().await?;
            link.received(Ok(first));
        }
        Ok(link)
    }

    /// Starts what is due and not already in flight.
    fn start(&mut self) {
        if self.sending.is_none() && !self.queued.is_empty() {
            let batch = std::mem::take(&mut self.queued);
            let client = self.client.clone();
            self.sending = Some(Box::pin(async move {
                let (tags, messages): (Vec<u16>, Vec<(PropertyBag, Bytes)>) =
                    batch.into_iter().map(|(t, p, b)| (t, (p, b))).unzip();
                let r = client.send(&messages).await;
                (tags, r)
            }));
        }
        if self.polling.is_none() && self.poll.is_some() && Instant::now() >= self.next_poll {
            let client = self.client.clone();
            self.polling = Some(Box::pin(async move { client.receive().await }));
        }
        if self.completing.is_none()
            && let Some(lock) = self.to_complete.pop_front()
        {
            let client = self.client.clone();
            self.completing = Some(Box::pin(async move { client.complete(&lock).await }));
        }
    }

    fn sent(&mut self, tags: Vec<u16>, r: Result<(), HttpError>) {
        match r {
            Ok(()) => self.ready.extend(tags.into_iter().map(Inbound::Acked)),
            // Refused for good: malformed or too large. Sending it again cannot help.
            Err(HttpError::Status { status: 400 | 413, detail, .. }) => {
                tracing::debug!(%detail, "the hub refused telemetry");
                self.ready.extend(tags.into_iter().map(Inbound::Rejected));
            }
            Err(e) => self.closed = Some(closed_by(e)),
        }
    }

    fn received(&mut self, r: Result<Received, HttpError>) {
        // Only devices poll; the interval is validated (at most a day), so the sum cannot overflow.
        let every = self.poll.unwrap_or_default();
        match r {
            Ok(Received::Empty) => self.next_poll = Instant::now() + every,
            Ok(Received::Message { lock, properties, body }) => {
                self.ready.push_back(Inbound::C2d { properties, payload: body });
                self.to_complete.push_back(lock);
                // More may wait: the next poll is now.
                self.next_poll = Instant::now();
            }
            Err(e) if matches!(e.status(), Some(401 | 403 | 404)) => self.closed = Some(closed_by(e)),
            Err(e) => {
                // A throttled or failed poll is tried again at the next interval; telemetry is
                // what tells the identity whether the hub is there.
                tracing::debug!(error = %e, "C2D poll failed");
                self.next_poll = Instant::now() + every;
            }
        }
    }
}

/// How a failed request ends the session.
fn closed_by(e: HttpError) -> Closed {
    match e.status() {
        Some(401 | 403 | 404) => Closed::Refused(e.to_string()),
        Some(429) => Closed::Lost("throttled"),
        Some(s) if s >= 500 => Closed::Lost("server_error"),
        Some(_) => Closed::Lost("protocol_error"),
        None => Closed::Lost("connection_lost"),
    }
}

/// Waits for an in-flight request, or forever if there is none; takes it out when done.
async fn settle<T>(slot: &mut Pending<T>) -> T {
    match slot.as_mut() {
        Some(f) => {
            let out = f.await;
            *slot = None;
            out
        }
        None => std::future::pending().await,
    }
}

impl Sink for HttpsLink {
    fn telemetry(&mut self, properties: &PropertyBag, body: Bytes) -> u16 {
        self.next_tag = self.next_tag.wrapping_add(1).max(1);
        self.queued.push((self.next_tag, properties.clone(), body));
        self.next_tag
    }

    // `caps().twin` is false: the core never asks for these.
    fn twin_get(&mut self) {}

    fn report(&mut self, _rid: &str, _patch: String) {}

    fn method_response(&mut self, _rid: &str, _status: u16, _payload: Bytes) {}
}

impl Link for HttpsLink {
    fn caps(&self) -> Caps {
        Caps { twin: false }
    }

    async fn flush(&mut self) -> Result<(), Closed> {
        if let Some(c) = self.closed.take() {
            return Err(c);
        }
        self.start();
        Ok(())
    }

    async fn next(&mut self, deadline: Instant, cancel: &CancellationToken) -> Result<Option<Inbound>, Closed> {
        loop {
            if let Some(ev) = self.try_next()? {
                return Ok(Some(ev));
            }
            self.start();
            if Instant::now() >= deadline {
                return Ok(None);
            }
            let wake = match (&self.polling, self.poll) {
                (None, Some(_)) => deadline.min(self.next_poll),
                _ => deadline,
            };
            tokio::select! {
                (tags, r) = settle(&mut self.sending) => self.sent(tags, r),
                r = settle(&mut self.polling) => self.received(r),
                r = settle(&mut self.completing) => {
                    if let Err(e) = r {
                        // The lock expired or the message is gone: the hub delivers it again.
                        tracing::debug!(error = %e, "C2D completion failed");
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
                _ = cancel.cancelled() => return Ok(None),
            }
        }
    }

    fn try_next(&mut self) -> Result<Option<Inbound>, Closed> {
        if let Some(ev) = self.ready.pop_front() {
            return Ok(Some(ev));
        }
        match self.closed.take() {
            Some(c) => Err(c),
            None => Ok(None),
        }
    }

    async fn close(mut self) {
        // Handled messages are completed before leaving, or the hub delivers them again.
        while let Some(lock) = self.to_complete.pop_front() {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.client.complete(&lock)).await;
        }
    }
}
