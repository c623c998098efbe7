//! Entry points for the fuzz targets in `fuzz/` and for `tests/fuzz_corpus.rs`, which replays the
//! kept corpus on every test run. Each takes arbitrary bytes and must neither panic nor hang; where
//! a parser has an inverse, the round trip is checked too. Not part of the product's API.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use crate::hub::config::HubConfig;
use crate::hub::state::{Hub, HubState};
use crate::iot::sas::{Key, sign_token};

fn text(data: &[u8]) -> String {
    String::from_utf8_lossy(data).into_owned()
}

/// Topic, filter, property-bag, username and sequence-stamp parsers, the twin query language,
/// and IoT Edge routes with their conditions.
pub fn topics(data: &[u8]) {
    use crate::iot::property_bag::PropertyBag;
    use crate::iot::topic::{CloudPublish, DevicePublish, Filter};
    let s = text(data);
    let _ = DevicePublish::parse(&s);
    let _ = CloudPublish::parse(&s);
    let _ = Filter::parse(&s, "dev", Some("mod"));
    let _ = Filter::parse(&s, "dev", None);
    let _ = crate::iot::username::Username::parse(&s);
    if let Ok(q) = crate::hub::query::Query::parse(&s) {
        q.matches(&serde_json::json!({"deviceId": "d", "tags": {"a": 1}, "properties": {"reported": {"b": "x"}}}));
    }
    use crate::iot::route_condition::{JSON_UTF8, Parts};
    for route in [s.to_string(), format!("FROM /messages/* WHERE {s} INTO $upstream")] {
        if let Ok(r) = crate::iot::route::Route::parse(&route) {
            let source = crate::iot::route::MessageSource::Module { module: "m", output: Some("o") };
            let body = br#"{"t":1,"s":"x","o":{"k":[1,"2",null]}}"#;
            let probe = Parts { properties: &[("a", "x")], system: &JSON_UTF8, body };
            r.takes(source, &probe);
        }
    }
    if let Some((run, n)) = crate::iot::sequence::parse(&s) {
        assert_eq!(crate::iot::sequence::parse(&crate::iot::sequence::stamp(run, n)), Some((run, n)));
    }
    if let Ok(bag) = PropertyBag::parse(&s) {
        let again = PropertyBag::parse(&bag.encode()).expect("an encoded bag parses");
        assert_eq!(again, bag, "property bags survive a round trip");
    }
}

/// SAS tokens and connection strings.
pub fn credentials(data: &[u8]) {
    let s = text(data);
    if let Ok(t) = crate::iot::sas::SasToken::parse(&s) {
        let key = Key::from_bytes(b"fuzz-key".to_vec());
        let _ = t.verify(&t.resource, &[key.clone(), key], 0, 0);
    }
    if let Ok(cs) = s.parse::<crate::iot::connection_string::ConnectionString>() {
        let again: crate::iot::connection_string::ConnectionString =
            cs.to_string().parse().expect("a printed connection string parses");
        assert_eq!(again.to_string(), cs.to_string());
    }
    let _ = crate::iot::sas::Key::from_base64(&s);
}

/// The scenario loader and the daemon config reader: errors, never panics.
pub fn scenario(data: &[u8]) {
    let path = std::path::Path::new("fuzz.toml");
    let _ = crate::scenario::schema::load_text(path, text(data));
    let _ = crate::config::DaemonConfig::parse(path, text(data));
}

struct Harness {
    rt: tokio::runtime::Runtime,
    hub: Hub,
    connect_hub: Vec<u8>,
    connect_dps: Vec<u8>,
}

/// A hub state with one device, `fuzz`, whose key is returned, and a token expiry years away.
/// The keys file is all the hub writes; one small directory per fuzzing process and harness.
fn fuzz_hub(name: &str) -> (Hub, Key, u64) {
    let dir = std::env::temp_dir().join(format!("fleetsim-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a temp dir");
    let config = HubConfig { data_dir: dir.clone(), ..Default::default() };
    let secrets = crate::hub::secrets::Secrets::load_or_create(&dir, &config.keys).expect("keys");
    let hub: Hub = Arc::new(HubState::new(&config, secrets).expect("hub state"));
    let key = Key::from_bytes(b"fuzz-device-key".to_vec());
    let record = crate::hub::registry::Record::new(key.clone(), key.clone());
    hub.registry.create("fuzz", None, record, SystemTime::now()).expect("the device is new");
    let expiry = crate::iot::time::unix_secs(SystemTime::now()) + 10 * 365 * 24 * 3600;
    (hub, key, expiry)
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let (hub, key, expiry) = fuzz_hub("fuzz");
        let connect = |client: &str, user: String, password: String| {
            let mut c = rumqttc::mqttbytes::v4::Connect::new(client);
            c.set_login(user, password);
            let mut buf = bytes::BytesMut::new();
            rumqttc::mqttbytes::v4::Packet::Connect(c).write(&mut buf, usize::MAX).expect("CONNECT encodes");
            buf.to_vec()
        };
        let connect_hub = connect(
            "fuzz",
            crate::iot::username::hub_username("localhost", "fuzz", None, None),
            sign_token("localhost/devices/fuzz", &key, expiry, None),
        );
        let group = Key::from_base64(&hub.secrets.default_group.primary).expect("group key");
        let dps_key = crate::iot::sas::derive_device_key(&group, "fuzz-dps");
        let scope = hub.dps.id_scope.clone();
        let connect_dps = connect(
            "fuzz-dps",
            crate::iot::username::dps_username(&scope, "fuzz-dps"),
            sign_token(&format!("{scope}/registrations/fuzz-dps"), &dps_key, expiry, Some("registration")),
        );
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        Harness { rt, hub, connect_hub, connect_dps }
    })
}

/// Telemetry messages the fuzzing hub has accepted, so the corpus test can tell that its seeds
/// get past CONNECT.
pub fn mqtt_telemetry_received() -> u64 {
    harness().hub.metrics.telemetry_received.get()
}

/// The emulator's MQTT connection handling, fed arbitrary bytes. The first byte picks what comes
/// before them: nothing (the CONNECT itself is fuzzed), an authenticated hub CONNECT, or an
/// authenticated DPS CONNECT, so the fuzzer reaches the topic routers too.
pub fn mqtt_session(data: &[u8]) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Some((&mode, rest)) = data.split_first() else { return };
    let h = harness();
    let mut input = match mode % 3 {
        0 => Vec::new(),
        1 => h.connect_hub.clone(),
        _ => h.connect_dps.clone(),
    };
    input.extend_from_slice(rest);
    h.rt.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 20);
        let serve = tokio::spawn(crate::hub::mqtt::connection::serve(h.hub.clone(), server, None));
        let _ = client.write_all(&input).await;
        let _ = client.shutdown().await;
        let mut sink = Vec::new();
        // End of input closes the connection; the bound only catches a hang, which is a finding.
        let drained = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut sink)).await;
        assert!(drained.is_ok(), "the connection did not end after its input did");
        let _ = serve.await;
    });
}

struct RestHarness {
    rt: tokio::runtime::Runtime,
    router: axum::Router,
    owner: String,
    registration: String,
    scope: String,
    /// A device token for `fuzz`, for the device API of HTTPS devices.
    device: String,
}

/// A hub of its own (so that fault settings the fuzzer makes never reach the MQTT harness) and
/// its REST router, called in-process.
fn rest_harness() -> &'static RestHarness {
    static H: OnceLock<RestHarness> = OnceLock::new();
    H.get_or_init(|| {
        let (hub, device_key, expiry) = fuzz_hub("fuzz-rest");
        let device = sign_token("localhost/devices/fuzz", &device_key, expiry, None);
        let owner_key = Key::from_base64(&hub.secrets.policies["iothubowner"].primary).expect("owner key");
        let owner = sign_token("localhost", &owner_key, expiry, Some("iothubowner"));
        let group = Key::from_base64(&hub.secrets.default_group.primary).expect("group key");
        let scope = hub.dps.id_scope.clone();
        let dps_key = crate::iot::sas::derive_device_key(&group, "fuzz-dps");
        let registration =
            sign_token(&format!("{scope}/registrations/fuzz-dps"), &dps_key, expiry, Some("registration"));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
        RestHarness { rt, router: crate::hub::https_router(hub), owner, registration, scope, device }
    })
}

/// The emulator's REST routes that parse a body or a query, fed arbitrary bodies through the real
/// router (authorization middleware included). The first byte picks the route, the rest is the
/// body. A panic, a hang or a 500 is a finding; any 4xx is the right answer to bad input.
pub fn rest(data: &[u8]) {
    use tower::ServiceExt;
    const ROUTES: &[(&str, &str)] = &[
        ("POST", "/devices/query"),
        ("PUT", "/devices/fuzz-new"),
        ("PUT", "/devices/fuzz/modules/m1"),
        ("PATCH", "/twins/fuzz"),
        ("PUT", "/twins/fuzz"),
        ("PATCH", "/twins/fuzz/modules/m1"),
        ("POST", "/twins/nobody/methods"),
        ("PUT", "/enrollments/e1"),
        ("PUT", "/enrollmentGroups/g1"),
        ("PATCH", "/emulator/faults"),
        ("PUT", "/emulator/faults"),
        ("POST", "/emulator/faults/outage"),
        ("POST", "/emulator/faults/drop"),
        ("POST", "/emulator/devices/fuzz/messages/deviceBound"),
        ("PUT", "/{scope}/registrations/fuzz-dps/register"),
    ];
    let Some((&pick, body)) = data.split_first() else { return };
    let h = rest_harness();
    let (method, path) = ROUTES[pick as usize % ROUTES.len()];
    let (path, token) = if path.starts_with("/{scope}") {
        (path.replace("{scope}", &h.scope), &h.registration)
    } else {
        (path.to_owned(), &h.owner)
    };
    if path == "/devices/query"
        && let Ok(q) = crate::hub::query::Query::parse(&text(body))
    {
        q.matches(&serde_json::json!({"deviceId": "d", "tags": {"a": 1}, "properties": {"reported": {"b": "x"}}}));
    }
    let req = axum::http::Request::builder()
        .method(method)
        .uri(format!("{path}?api-version=2021-04-12"))
        .header("authorization", token)
        .header("content-type", "application/json")
        .body(axum::body::Body::from(body.to_vec()))
        .expect("a request");
    h.rt.block_on(async {
        let resp = tokio::time::timeout(Duration::from_secs(5), h.router.clone().oneshot(req)).await;
        let resp = resp.expect("the route answered in time").expect("infallible");
        assert_ne!(resp.status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR, "{method} {path}");
    });
}

/// The device API of HTTPS devices (telemetry, C2D receive and settlement), fed arbitrary
/// requests through the real router as the device `fuzz`. The first byte picks the request; for
/// telemetry the rest is `header lines` (`name: value`, any bytes; lines that cannot be headers are
/// skipped), a blank line, then the body; for a settlement it is the lock token. A panic, a hang
/// or a 500 is a finding.
pub fn device_rest(data: &[u8]) {
    use tower::ServiceExt;
    let Some((&pick, rest)) = data.split_first() else { return };
    let h = rest_harness();
    let (head, body) = match rest.windows(2).position(|w| w == b"\n\n") {
        Some(i) => (&rest[..i], &rest[i + 2..]),
        None => (&[][..], rest),
    };
    let token = crate::iot::encoding::url_encode(&text(body));
    let (method, path) = match pick % 6 {
        0 | 1 => ("POST", "/devices/fuzz/messages/events".to_owned()),
        2 => ("GET", "/devices/fuzz/messages/deviceBound".to_owned()),
        3 => ("DELETE", format!("/devices/fuzz/messages/deviceBound/{token}")),
        4 => ("POST", format!("/devices/fuzz/messages/devicebound/{token}/abandon")),
        _ => ("POST", "/devices/fuzz/modules/m1/messages/events".to_owned()),
    };
    let query = if pick % 12 == 3 { "&reject" } else { "" };
    let Ok(uri) = format!("{path}?api-version=2021-04-12{query}").parse::<axum::http::Uri>() else { return };
    let mut req = axum::http::Request::builder().method(method).uri(uri).header("authorization", &h.device);
    if pick % 6 == 1 {
        req = req.header("content-type", "application/vnd.microsoft.iothub.json");
    }
    for line in head.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else { continue };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii_start());
        if let (Ok(n), Ok(v)) = (axum::http::HeaderName::from_bytes(name), axum::http::HeaderValue::from_bytes(value)) {
            req = req.header(n, v);
        }
    }
    let Ok(req) = req.body(axum::body::Body::from(body.to_vec())) else { return };
    h.rt.block_on(async {
        let resp = tokio::time::timeout(Duration::from_secs(5), h.router.clone().oneshot(req)).await;
        let resp = resp.expect("the route answered in time").expect("infallible");
        assert_ne!(resp.status(), axum::http::StatusCode::INTERNAL_SERVER_ERROR, "{method} {path}");
    });
}
