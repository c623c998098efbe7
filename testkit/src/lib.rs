//! Test harness: a real emulator on loopback (port 0, its own data dir), a REST helper that signs
//! service tokens, and a raw MQTT 3.1.1 client over real TLS for the cases no SDK would send.
//! Waits are bounded so a broken hub fails a test instead of hanging it; nothing asserts speed.
//! A crate of its own (used as `common` by the tests), so it is compiled once, not once per test
//! binary.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::{Bytes, BytesMut};
use fleetsim::hub::config::HubConfig;
use fleetsim::hub::info::HubInfo;
use fleetsim::hub::{self, RunningHub};
use fleetsim::iot::sas::{Key, sign_token};
use fleetsim::iot::time::unix_secs;
use fleetsim::iot::username::hub_username;
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{
    ConnAck, Connect, ConnectReturnCode, Packet, PubAck, Publish, Subscribe, SubscribeReasonCode,
};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

/// How long any single wait may take before the test fails as hung.
pub const WAIT: Duration = Duration::from_secs(15);

/// Everything a test needs to talk to a running emulator, found through its hub.json.
pub struct Api {
    pub info: HubInfo,
    pub http: reqwest::Client,
    pub tls: Arc<rustls::ClientConfig>,
    /// keys.json beside hub.json: every policy's keys.
    keys: Value,
}

pub struct TestHub {
    pub hub: Option<RunningHub>,
    pub api: Api,
    pub dir: tempfile::TempDir,
}

impl std::ops::Deref for TestHub {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

pub fn install_crypto() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

pub fn future(secs: u64) -> u64 {
    unix_secs(SystemTime::now()) + secs
}

impl TestHub {
    pub async fn start() -> TestHub {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut HubConfig)) -> TestHub {
        let dir = tempfile::tempdir().unwrap();
        Self::start_in(dir, adjust).await
    }

    pub async fn start_in(dir: tempfile::TempDir, adjust: impl FnOnce(&mut HubConfig)) -> TestHub {
        install_crypto();
        let mut config = HubConfig {
            data_dir: dir.path().to_owned(),
            mqtt_addr: "127.0.0.1:0".parse().unwrap(),
            https_addr: "127.0.0.1:0".parse().unwrap(),
            amqp_addr: Some("127.0.0.1:0".parse().unwrap()),
            metrics_addr: Some("127.0.0.1:0".parse().unwrap()),
            ..Default::default()
        };
        adjust(&mut config);
        let hub = hub::start(config).await.expect("hub starts");
        let api = Api::new(hub.info.clone());
        TestHub { hub: Some(hub), api, dir }
    }

    pub async fn stop(&mut self) {
        if let Some(h) = self.hub.take() {
            h.shutdown().await;
        }
    }

    pub fn state(&self) -> &fleetsim::hub::state::HubState {
        &self.hub.as_ref().unwrap().state
    }
}

impl Api {
    pub fn new(info: HubInfo) -> Api {
        install_crypto();
        let tls = fleetsim::client::transport::client_config(Some(&info.ca_file)).unwrap();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(rustls::ClientConfig::clone(&tls))
            .resolve("localhost", info.https_addr)
            .build()
            .unwrap();
        let keys = serde_json::from_slice(&std::fs::read(info.ca_file.with_file_name("keys.json")).unwrap()).unwrap();
        Api { info, http, tls, keys }
    }

    pub fn policy_key(&self, policy: &str) -> Key {
        Key::from_base64(self.keys["policies"][policy]["primary"].as_str().unwrap()).unwrap()
    }

    pub fn service_token(&self, policy: &str) -> String {
        sign_token(&self.info.hostname, &self.policy_key(policy), future(3600), Some(policy))
    }

    pub fn url(&self, path: &str) -> String {
        let sep = if path.contains('?') { '&' } else { '?' };
        format!("https://localhost:{}{path}{sep}api-version=2021-04-12", self.info.https_port)
    }

    /// A REST call as `iothubowner`; returns status, headers and the JSON body (Null if none).
    pub async fn rest(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        self.rest_as("iothubowner", method, path, body, &[]).await
    }

    pub async fn rest_as(
        &self,
        policy: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        self.rest_with_token(&self.service_token(policy), method, path, body, headers).await
    }

    /// A REST call as `iothubowner` with a raw body (sent as JSON, whatever it holds); returns
    /// the status and the body's text.
    pub async fn http_raw(&self, method: &str, path: &str, body: String) -> (u16, String) {
        let req = self
            .http
            .request(method.parse().unwrap(), self.url(path))
            .header("authorization", self.service_token("iothubowner"))
            .header("content-type", "application/json")
            .body(body);
        let resp = tokio::time::timeout(WAIT, req.send()).await.expect("REST call hung").unwrap();
        let status = resp.status().as_u16();
        (status, resp.text().await.unwrap_or_default())
    }

    /// A REST call with the given Authorization header.
    pub async fn rest_with_token(
        &self,
        token: &str,
        method: &str,
        path: &str,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let request = || {
            let mut req = self.http.request(method.parse().unwrap(), self.url(path)).header("authorization", token);
            for (k, v) in headers {
                req = req.header(*k, *v);
            }
            if let Some(b) = &body {
                req = req.json(b);
            }
            req
        };
        // A pooled connection the hub closed under us (a `drop` fault closes every connection, the
        // HTTPS ones included) fails the request before it is sent: one fresh attempt, as any
        // HTTP client library would make for a connection lost before the request went out.
        let resp = match tokio::time::timeout(WAIT, request().send()).await.expect("REST call hung") {
            Ok(r) => r,
            Err(e) if e.is_request() => {
                tokio::time::timeout(WAIT, request().send()).await.expect("REST call hung").unwrap()
            }
            Err(e) => panic!("{e}"),
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await.unwrap();
        let json = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into()))
        };
        (status, headers, json)
    }

    /// Creates a device with generated keys; returns its primary key.
    pub async fn create_device(&self, id: &str) -> Key {
        let (status, _, body) =
            self.rest("PUT", &format!("/devices/{id}"), Some(serde_json::json!({"deviceId": id}))).await;
        assert_eq!(status, 200, "{body}");
        Key::from_base64(body["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap()).unwrap()
    }

    pub async fn create_module(&self, device: &str, module: &str) -> Key {
        let (status, _, body) = self
            .rest(
                "PUT",
                &format!("/devices/{device}/modules/{module}"),
                Some(serde_json::json!({"deviceId": device, "moduleId": module})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        Key::from_base64(body["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap()).unwrap()
    }

    pub fn device_token(&self, device: &str, module: Option<&str>, key: &Key, expiry: u64) -> String {
        let resource = match module {
            Some(m) => format!("{}/devices/{device}/modules/{m}", self.info.hostname),
            None => format!("{}/devices/{device}", self.info.hostname),
        };
        sign_token(&resource, key, expiry, None)
    }

    pub async fn mqtt(&self) -> MqttClient {
        self.mqtt_over(self.tls.clone()).await
    }

    /// An MQTT connection made with `tls` (a client certificate, for X.509 devices).
    pub async fn mqtt_over(&self, tls: Arc<rustls::ClientConfig>) -> MqttClient {
        let tcp = TcpStream::connect(self.info.mqtt_addr).await.unwrap();
        let tls = TlsConnector::from(tls).connect("localhost".try_into().unwrap(), tcp).await.unwrap();
        MqttClient { stream: tls, rbuf: BytesMut::new(), next_pkid: 0 }
    }

    /// A client TLS config that trusts the hub and presents `chain` (leaf first) with `key`.
    pub fn tls_with_cert(
        &self,
        chain: Vec<rustls::pki_types::CertificateDer<'static>>,
        key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in self.tls_roots() {
            roots.add(c).unwrap();
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        Arc::new(cfg)
    }

    fn tls_roots(&self) -> Vec<rustls::pki_types::CertificateDer<'static>> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::pem_file_iter(&self.info.ca_file).unwrap().map(|c| c.unwrap()).collect()
    }

    /// A device or module connected with a valid token (CleanSession as given).
    pub async fn connect(&self, device: &str, module: Option<&str>, key: &Key, clean: bool) -> MqttClient {
        let mut c = self.mqtt().await;
        let client_id = match module {
            Some(m) => format!("{device}/{m}"),
            None => device.to_owned(),
        };
        let code = c
            .connect(
                &client_id,
                &hub_username(&self.info.hostname, device, module, None),
                &self.device_token(device, module, key, future(3600)),
                clean,
                60,
            )
            .await;
        assert_eq!(code, Some(ConnectReturnCode::Success));
        c
    }

    pub async fn metrics(&self) -> String {
        let url = self.info.metrics_url.clone().unwrap();
        reqwest::get(url).await.unwrap().text().await.unwrap()
    }

    /// The value of one metric line, e.g. `fleetsim_hub_telemetry_received_total`.
    pub async fn metric(&self, series: &str) -> f64 {
        let text = self.metrics().await;
        text.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Telemetry the hub kept for an identity.
    pub async fn events(&self, device: &str, module: Option<&str>) -> Value {
        let path = match module {
            Some(m) => format!("/emulator/devices/{device}/modules/{m}/messages/events"),
            None => format!("/emulator/devices/{device}/messages/events"),
        };
        let (status, _, body) = self.rest("GET", &path, None).await;
        assert_eq!(status, 200, "{body}");
        body
    }
}

pub struct MqttClient {
    stream: TlsStream<TcpStream>,
    rbuf: BytesMut,
    next_pkid: u16,
}

impl MqttClient {
    pub async fn send(&mut self, p: Packet) {
        let mut buf = BytesMut::new();
        p.write(&mut buf, usize::MAX).unwrap();
        // A hub that already closed may refuse the write; the next recv reports the close.
        let _ = self.stream.write_all(&buf).await;
        let _ = self.stream.flush().await;
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
        let _ = self.stream.flush().await;
    }

    /// The next packet, or `None` when the hub closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, async {
            loop {
                match Packet::read(&mut self.rbuf, 1 << 20) {
                    Ok(p) => return Some(p),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => {}
                    Err(e) => panic!("hub sent a malformed packet: {e}"),
                }
                self.rbuf.reserve(4096);
                match self.stream.read_buf(&mut self.rbuf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("no packet and no close from the hub")
    }

    /// Sends CONNECT; the CONNACK code, or `None` if the hub closed without one.
    pub async fn connect(
        &mut self,
        client_id: &str,
        username: &str,
        password: &str,
        clean: bool,
        keep_alive: u16,
    ) -> Option<ConnectReturnCode> {
        let mut c = Connect::new(client_id);
        c.set_login(username, password);
        c.clean_session = clean;
        c.keep_alive = keep_alive;
        self.send(Packet::Connect(c)).await;
        match self.recv().await {
            Some(Packet::ConnAck(ConnAck { code, .. })) => Some(code),
            None => None,
            Some(other) => panic!("expected CONNACK, got {other:?}"),
        }
    }

    pub fn pkid(&mut self) -> u16 {
        self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
        self.next_pkid
    }

    pub async fn publish(&mut self, topic: &str, payload: impl Into<Bytes>, qos: QoS) -> u16 {
        let mut p = Publish::from_bytes(topic, qos, payload.into());
        if qos != QoS::AtMostOnce {
            p.pkid = self.pkid();
        }
        let id = p.pkid;
        self.send(Packet::Publish(p)).await;
        id
    }

    pub async fn subscribe(&mut self, filters: &[(&str, QoS)]) -> Vec<SubscribeReasonCode> {
        let mut s = Subscribe::new_many(
            filters.iter().map(|(f, q)| rumqttc::mqttbytes::v4::SubscribeFilter::new((*f).to_owned(), *q)),
        );
        s.pkid = self.pkid();
        self.send(Packet::Subscribe(s)).await;
        loop {
            match self.recv().await {
                Some(Packet::SubAck(a)) => return a.return_codes,
                Some(_) => continue,
                None => panic!("connection closed instead of SUBACK"),
            }
        }
    }

    /// The next PUBLISH from the hub (acknowledged if QoS 1), skipping acks and pings.
    pub async fn next_publish(&mut self) -> Publish {
        self.try_next_publish(true).await.expect("connection closed while waiting for a publish")
    }

    pub async fn try_next_publish(&mut self, ack: bool) -> Option<Publish> {
        loop {
            match self.recv().await? {
                Packet::Publish(p) => {
                    if ack && p.qos == QoS::AtLeastOnce {
                        self.send(Packet::PubAck(PubAck::new(p.pkid))).await;
                    }
                    return Some(p);
                }
                _ => continue,
            }
        }
    }

    /// True if nothing at all (no packet, no close) arrives for `d`: the hub is silent.
    pub async fn silent_for(&mut self, d: Duration) -> bool {
        tokio::time::timeout(d, async {
            loop {
                if let Ok(p) = Packet::read(&mut self.rbuf, 1 << 20) {
                    return p;
                }
                self.rbuf.reserve(4096);
                if let Ok(0) | Err(_) = self.stream.read_buf(&mut self.rbuf).await {
                    return Packet::Disconnect;
                }
            }
        })
        .await
        .is_err()
    }

    /// Waits for the PUBACK of `pkid`, skipping other packets.
    pub async fn puback(&mut self, pkid: u16) {
        loop {
            match self.recv().await {
                Some(Packet::PubAck(a)) if a.pkid == pkid => return,
                Some(_) => continue,
                None => panic!("connection closed before PUBACK {pkid}"),
            }
        }
    }

    /// True once the hub has closed the connection (any packets before that are skipped).
    pub async fn closed(&mut self) -> bool {
        while self.recv().await.is_some() {}
        true
    }
}

/// Polls `check` every 100 ms until it holds, failing the test after `WAIT`. Tests wait for a
/// condition this way, never for a fixed time standing in for "it happened".
pub async fn wait_until<F, Fut>(what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    wait_until_for(what, WAIT, check).await
}

/// `wait_until` with its own bound, for conditions that take longer than `WAIT` by design.
pub async fn wait_until_for<F, Fut>(what: &str, bound: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + bound;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {bound:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `check` every 100 ms until it yields a value, failing the test after `WAIT`.
pub async fn poll_until<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {WAIT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `check` every 100 ms for all of `window`, failing the test the first time it does not
/// hold: for what must not happen (a stale acknowledgement overwriting a newer one), where only a
/// window of watching can tell.
pub async fn holds_for<F, Fut>(what: &str, window: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = tokio::time::Instant::now() + window;
    while tokio::time::Instant::now() < end {
        assert!(check().await, "{what} stopped holding");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `f` every 100 ms, without a runtime (tests that drive a `fleetsim` process), until it
/// gives a value; fails the test after `bound`.
pub fn poll_blocking<T>(what: &str, bound: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + bound;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out after {bound:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A fleet with its embedded emulator, started in-process from scenario files.
pub struct FleetUnderTest {
    pub fleet: Option<fleetsim::fleet::RunningFleet>,
    pub api: Api,
    pub dir: tempfile::TempDir,
}

impl std::ops::Deref for FleetUnderTest {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

/// A path under the repository (this crate is its `testkit/`).
pub fn repo(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("testkit/ is in the repository").join(path)
}

impl FleetUnderTest {
    /// Starts the scenarios (paths) with `extra` appended to the daemon config, and waits until
    /// every identity has connected.
    pub async fn start(scenarios: &[std::path::PathBuf], extra: &str) -> FleetUnderTest {
        Self::start_inner(scenarios, extra, None).await
    }

    /// Like `start`, with the embedded emulator configured by a hub TOML file.
    pub async fn start_with_hub_config(
        scenarios: &[std::path::PathBuf],
        extra: &str,
        hub_config: &std::path::Path,
    ) -> FleetUnderTest {
        Self::start_inner(scenarios, extra, Some(hub_config)).await
    }

    async fn start_inner(
        scenarios: &[std::path::PathBuf],
        extra: &str,
        hub_config: Option<&std::path::Path>,
    ) -> FleetUnderTest {
        install_crypto();
        let dir = tempfile::tempdir().unwrap();
        let hub_line = hub_config.map(|p| format!("config = {:?}\n", p.display().to_string())).unwrap_or_default();
        let list: Vec<String> = scenarios.iter().map(|p| format!("{:?}", p.display().to_string())).collect();
        let text = format!(
            "scenarios = [{}]\n[hub]\nmode = \"embedded\"\ndata_dir = {:?}\nmqtt_addr = \"127.0.0.1:0\"\nhttps_addr = \"127.0.0.1:0\"\n{hub_line}[metrics]\nenabled = false\n[ramp]\nrate = 2000\n{extra}",
            list.join(", "),
            dir.path().join("hub").display().to_string()
        );
        let path = dir.path().join("fleet.toml");
        std::fs::write(&path, &text).unwrap();
        let cfg = fleetsim::config::DaemonConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
        let templates = fleetsim::scenario::schema::load(&cfg.scenarios).unwrap_or_else(|e| panic!("{e}"));
        let fleet = fleetsim::fleet::start(&cfg, templates, Default::default()).await.expect("fleet starts");
        let api = Api::new(fleet.hub_info.clone().unwrap());
        let f = FleetUnderTest { fleet: Some(fleet), api, dir };
        let total = f.fleet().identities() as i64;
        f.wait_for("every identity to connect", || async { f.fleet().connected_once() == total }).await;
        f
    }

    pub fn fleet(&self) -> &fleetsim::fleet::RunningFleet {
        self.fleet.as_ref().unwrap()
    }

    pub fn metrics(&self) -> &fleetsim::metrics::FleetMetrics {
        &self.fleet().shared.metrics
    }

    pub fn hub_state(&self) -> &fleetsim::hub::state::HubState {
        &self.fleet().hub.as_ref().unwrap().state
    }

    pub async fn stop(&mut self) {
        if let Some(f) = self.fleet.take() {
            f.shutdown().await;
        }
    }

    /// Polls `check` until it holds, failing the test after `WAIT`.
    pub async fn wait_for<F, Fut>(&self, what: &str, check: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        wait_until(what, check).await
    }

    fn twin_path(device: &str, module: Option<&str>) -> String {
        match module {
            Some(m) => format!("/twins/{device}/modules/{m}"),
            None => format!("/twins/{device}"),
        }
    }

    /// Invokes a direct method; returns the HTTP status and the body.
    pub async fn invoke(&self, device: &str, module: Option<&str>, method: &str, payload: Value) -> (u16, Value) {
        let path = format!("{}/methods", Self::twin_path(device, module));
        let (status, _, body) = self
            .rest(
                "POST",
                &path,
                Some(serde_json::json!({"methodName": method, "payload": payload, "responseTimeoutInSeconds": 10})),
            )
            .await;
        (status, body)
    }

    pub async fn twin(&self, device: &str, module: Option<&str>) -> Value {
        let (status, _, body) = self.rest("GET", &Self::twin_path(device, module), None).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Patches desired properties; returns the new desired `$version`.
    pub async fn set_desired(&self, device: &str, module: Option<&str>, desired: Value) -> u64 {
        let (status, _, body) = self
            .rest(
                "PATCH",
                &Self::twin_path(device, module),
                Some(serde_json::json!({"properties": {"desired": desired}})),
            )
            .await;
        assert_eq!(status, 200, "{body}");
        body["properties"]["desired"]["$version"].as_u64().unwrap()
    }

    /// Waits until a reported property satisfies `check`, and returns it.
    pub async fn reported_until(
        &self,
        device: &str,
        module: Option<&str>,
        name: &str,
        check: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let twin = self.twin(device, module).await;
            let last = twin["properties"]["reported"][name].clone();
            if check(&last) {
                return last;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "reported {name} of {device} never satisfied the check; last: {last}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}
