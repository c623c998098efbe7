//! One AMQP 1.0 connection to a hub's service side over TLS, on `fe2o3-amqp`'s client: SASL
//! ANONYMOUS, then claims-based security (a `$cbs` put-token per audience), and the
//! request/response pattern `$cbs` and `$management` share ("AMQP 1.0 in Azure Service Bus and
//! Event Hubs protocol guide": claims-based authorization, management requests). Real Azure and
//! the emulator are spoken to the same way; only the trusted CA differs.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use fe2o3_amqp::connection::ConnectionHandle;
use fe2o3_amqp::link::{Receiver, Sender};
use fe2o3_amqp::sasl_profile::SaslProfile;
use fe2o3_amqp::session::SessionHandle;
use fe2o3_amqp::types::messaging::{AmqpValue, ApplicationProperties, Body, Message, MessageId, Properties, Source};
use fe2o3_amqp::types::primitives::{SimpleValue, Value};
use fe2o3_amqp::{Connection, Session};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Longest a connect, an attach or a management answer may take.
pub const STEP: Duration = Duration::from_secs(30);

/// An open connection and its one session.
pub struct Link {
    pub connection: ConnectionHandle<()>,
    pub session: SessionHandle<()>,
}

pub async fn within<T, E: std::fmt::Display>(
    what: &str,
    f: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(STEP, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(anyhow!("{what}: {e}")),
        Err(_) => Err(anyhow!("{what}: no answer within {}s", STEP.as_secs())),
    }
}

impl Link {
    /// TCP to `addr` (`host:port`), TLS checked against `tls` for `host`, SASL ANONYMOUS, one
    /// session. Authorization comes after, per audience, through `put_token`.
    pub async fn open(addr: &str, host: &str, tls: Arc<rustls::ClientConfig>) -> anyhow::Result<Link> {
        let tcp = tokio::time::timeout(STEP, TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr}: no answer within {}s", STEP.as_secs()))?
            .with_context(|| format!("connecting to {addr}"))?;
        let _ = tcp.set_nodelay(true);
        let name = rustls_pki_types::ServerName::try_from(host.to_owned())
            .map_err(|_| anyhow!("`{host}` is not a host name"))?;
        let stream = within("TLS", TlsConnector::from(tls).connect(name, tcp)).await?;
        let mut connection = within(
            "AMQP open",
            Connection::builder()
                .container_id(format!("fleetsim-{}", uuid::Uuid::new_v4()))
                .hostname(host)
                .sasl_profile(SaslProfile::Anonymous)
                .open_with_stream(stream),
        )
        .await?;
        let session = match within("AMQP begin", Session::begin(&mut connection)).await {
            Ok(s) => s,
            Err(e) => {
                let _ = connection.close().await;
                return Err(e);
            }
        };
        Ok(Link { connection, session })
    }

    /// Sends one request to `node` and waits for its answer: `(status-code, body)`. A status of
    /// 200 to 299 is success for both `$cbs` and `$management`.
    pub async fn request(&mut self, node: &str, props: &[(&str, &str)], body: Value) -> anyhow::Result<(i32, Value)> {
        let id = uuid::Uuid::new_v4().to_string();
        let reply_to = format!("{node}-reply-{id}");
        let mut sender =
            within("request link", Sender::attach(&mut self.session, format!("{node}-req-{id}"), node)).await?;
        let source = Source::builder().address(node).build();
        let receiver = Receiver::builder()
            .name(format!("{node}-resp-{id}"))
            .source(source)
            .target(reply_to.clone())
            .auto_accept(true)
            .attach(&mut self.session);
        let mut receiver = within("reply link", receiver).await?;
        let mut app = ApplicationProperties::default();
        for (k, v) in props {
            app.0.insert((*k).to_owned(), SimpleValue::String((*v).to_owned()));
        }
        let msg = Message::builder()
            .properties(Properties {
                message_id: Some(MessageId::String(id.clone())),
                reply_to: Some(reply_to),
                ..Default::default()
            })
            .application_properties(app)
            .body(Body::Value(AmqpValue(body)))
            .build();
        let answer = async {
            within("request", sender.send(msg)).await?;
            loop {
                let d = within("answer", receiver.recv::<Body<Value>>()).await?;
                let m = d.into_message();
                let ours = m.properties.as_ref().and_then(|p| p.correlation_id.as_ref())
                    == Some(&MessageId::String(id.clone()));
                if ours {
                    return anyhow::Ok(m);
                }
            }
        }
        .await;
        let _ = sender.close().await;
        let _ = receiver.close().await;
        let m = answer?;
        let app = m.application_properties.as_ref().map(|a| &a.0);
        let status = match app.and_then(|a| a.get("status-code").or_else(|| a.get("statusCode"))) {
            Some(SimpleValue::Int(c)) => *c,
            Some(SimpleValue::Long(c)) => i32::try_from(*c).unwrap_or(500),
            _ => bail!("the answer from {node} has no status-code"),
        };
        let body = match m.body {
            Body::Value(v) => v.0,
            _ => Value::Null,
        };
        Ok((status, body))
    }

    /// Puts a SAS token for `audience` on `$cbs`. Refusals carry the node's status and
    /// description; the token itself never appears in an error.
    pub async fn put_token(&mut self, audience: &str, token: String) -> anyhow::Result<()> {
        let props = [("operation", "put-token"), ("type", "servicebus.windows.net:sastoken"), ("name", audience)];
        let (status, _) = self.request("$cbs", &props, Value::String(token)).await?;
        if !(200..300).contains(&status) {
            bail!("the hub refused the token for {audience} (status {status})");
        }
        Ok(())
    }

    pub async fn close(self) {
        let Link { mut connection, mut session } = self;
        let _ = session.end().await;
        let _ = connection.close().await;
    }
}
