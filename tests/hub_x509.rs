//! X.509 in the emulator's IoT Hub side, over real TLS: the registry's `selfSigned`,
//! `certificateAuthority` and `none` identities in IoT Hub's JSON (single, bulk, restart), the
//! CA certificates API with its proof of possession, and CONNECT decided by the client
//! certificate: thumbprints, chains to a verified CA, validity, subject CN, each refusal a
//! CONNACK 5 counted by reason. Certificates are made here with rcgen.

use fleetsim_testkit as common;

use std::sync::Arc;

use common::{Api, TestHub, future};
use fleetsim::iot::username::hub_username;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::ConnectReturnCode;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde_json::{Value, json};

/// A certificate and its key.
struct Made {
    der: CertificateDer<'static>,
    pem: String,
    key: KeyPair,
}

impl Made {
    fn key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.serialize_der()))
    }

    fn sha1(&self) -> String {
        fleetsim::hub::x509::thumbprints(&self.der).0
    }

    fn sha256(&self) -> String {
        fleetsim::hub::x509::thumbprints(&self.der).1
    }
}

fn params(cn: &str, from: i32, to: i32) -> CertificateParams {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, cn);
    p.not_before = rcgen::date_time_ymd(from, 1, 1);
    p.not_after = rcgen::date_time_ymd(to, 1, 1);
    p
}

fn self_signed(cn: &str, from: i32, to: i32) -> Made {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let cert = params(cn, from, to).self_signed(&key).unwrap();
    Made { der: cert.der().clone(), pem: cert.pem(), key }
}

fn ca(cn: &str) -> (Made, CertificateParams) {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = params(cn, 2020, 2090);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let cert = p.self_signed(&key).unwrap();
    (Made { der: cert.der().clone(), pem: cert.pem(), key }, p)
}

fn signed(cn: &str, from: i32, to: i32, issuer: &(Made, CertificateParams)) -> Made {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let iss = Issuer::from_params(&issuer.1, &issuer.0.key);
    let cert = params(cn, from, to).signed_by(&key, &iss).unwrap();
    Made { der: cert.der().clone(), pem: cert.pem(), key }
}

/// CONNECT as `device` (module) with `cert` presented and an empty password, as the SDKs do.
async fn connect_with(hub: &Api, device: &str, module: Option<&str>, cert: &Made) -> Option<ConnectReturnCode> {
    let tls = hub.tls_with_cert(vec![cert.der.clone()], cert.key_der());
    let client_id = module.map_or(device.to_owned(), |m| format!("{device}/{m}"));
    let user = hub_username(&hub.info.hostname, device, module, None);
    hub.mqtt_over(tls).await.connect(&client_id, &user, "", true, 60).await
}

async fn refused(hub: &Api, reason: &str) -> f64 {
    hub.metric(&format!("fleetsim_hub_connections_refused_total{{reason=\"{reason}\"}}")).await
}

async fn put(hub: &Api, path: &str, body: Value) -> (u16, Value) {
    let (status, _, body) = hub.rest("PUT", path, Some(body)).await;
    (status, body)
}

#[tokio::test]
async fn the_registry_keeps_x509_identities_in_iot_hubs_shapes_across_a_restart() {
    let mut hub = TestHub::start().await;
    let (p1, s256) = ("A".repeat(40), "0123456789abcdef".repeat(4));
    let (status, d) = put(
        &hub,
        "/devices/ss",
        json!({"deviceId": "ss", "authentication": {"type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": p1, "secondaryThumbprint": s256}}}),
    )
    .await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["authentication"]["type"], "selfSigned");
    assert_eq!(d["authentication"]["x509Thumbprint"], json!({"primaryThumbprint": p1, "secondaryThumbprint": s256}));
    assert_eq!(d["authentication"]["symmetricKey"], json!({"primaryKey": null, "secondaryKey": null}));
    let (status, d) = put(&hub, "/devices/ca", json!({"authentication": {"type": "certificateAuthority"}})).await;
    assert_eq!((status, &d["authentication"]["type"]), (200, &json!("certificateAuthority")), "{d}");
    assert_eq!(d["authentication"]["x509Thumbprint"]["primaryThumbprint"], Value::Null);
    let (status, m) = put(&hub, "/devices/ca/modules/m", json!({"authentication": {"type": "none"}})).await;
    assert_eq!((status, &m["authentication"]["type"]), (200, &json!("none")), "{m}");
    let (_, _, twin) = hub.rest("GET", "/twins/ss", None).await;
    assert_eq!(twin["authenticationType"], "selfSigned");
    assert_eq!(twin["x509Thumbprint"]["primaryThumbprint"], json!(p1));

    // What IoT Hub refuses: 400 ArgumentInvalid naming the field.
    for (path, auth, field) in [
        ("/devices/bad1", json!({"type": "selfSigned"}), "primaryThumbprint"),
        (
            "/devices/bad2",
            json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": "XYZ"}}),
            "primaryThumbprint",
        ),
        (
            "/devices/bad3",
            json!({"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": p1, "secondaryThumbprint": "A".repeat(41)}}),
            "secondaryThumbprint",
        ),
        ("/devices/bad4", json!({"type": "none"}), "modules"),
        ("/devices/bad5", json!({"type": "kerberos"}), "kerberos"),
    ] {
        let (status, h, e) = hub.rest("PUT", path, Some(json!({"authentication": auth}))).await;
        assert_eq!(status, 400, "{path}: {e}");
        assert_eq!(h["iothub-errorcode"], "ArgumentInvalid", "{path}");
        assert!(e["Message"].as_str().unwrap().contains(field), "{path}: {e}");
    }
    // Bulk create goes through the same rules.
    let (status, _, r) = hub
        .rest(
            "POST",
            "/devices",
            Some(json!([
                {"id": "bulk-ss", "importMode": "create",
                 "authentication": {"type": "selfSigned", "x509Thumbprint": {"primaryThumbprint": s256}}},
                {"id": "bulk-bad", "importMode": "create", "authentication": {"type": "selfSigned"}},
            ])),
        )
        .await;
    assert_eq!(status, 400, "{r}");
    assert_eq!(r["errors"].as_array().map(Vec::len), Some(1), "{r}");
    // An update that leaves `authentication` out keeps it; one that names `sas` switches back.
    let (status, d) = put_if(&hub, "/devices/ss", json!({"status": "disabled"})).await;
    assert_eq!((status, &d["authentication"]["type"]), (200, &json!("selfSigned")), "{d}");

    hub.stop().await;
    let TestHub { dir, .. } = hub;
    let hub = TestHub::start_in(dir, |_| {}).await;
    let (_, _, d) = hub.rest("GET", "/devices/ss", None).await;
    assert_eq!(d["authentication"]["x509Thumbprint"], json!({"primaryThumbprint": p1, "secondaryThumbprint": s256}));
    assert_eq!(d["status"], "disabled");
    let (_, _, d) = hub.rest("GET", "/devices/bulk-ss", None).await;
    assert_eq!(d["authentication"]["x509Thumbprint"]["primaryThumbprint"], json!(s256));
    let (_, _, d) = hub.rest("GET", "/devices/ca", None).await;
    assert_eq!(d["authentication"]["type"], "certificateAuthority");
    let (_, _, m) = hub.rest("GET", "/devices/ca/modules/m", None).await;
    assert_eq!(m["authentication"]["type"], "none");
    let (status, d) = put_if(&hub, "/devices/ss", json!({"authentication": {"type": "sas"}})).await;
    assert_eq!(status, 200, "{d}");
    assert!(d["authentication"]["symmetricKey"]["primaryKey"].as_str().is_some_and(|k| !k.is_empty()), "{d}");
}

async fn put_if(hub: &Api, path: &str, body: Value) -> (u16, Value) {
    let (status, _, b) = hub.rest_as("iothubowner", "PUT", path, Some(body), &[("if-match", "*")]).await;
    (status, b)
}

#[tokio::test]
async fn self_signed_devices_connect_by_thumbprint_and_are_refused_by_reason() {
    let hub = TestHub::start().await;
    let good = self_signed("ss1", 2020, 2090);
    let other = self_signed("ss1", 2020, 2090);
    let expired = self_signed("ss1", 2020, 2021);
    let early = self_signed("ss1", 2080, 2090);
    let wrong_cn = self_signed("someone", 2020, 2090);
    let auth = |p: &Made, s: &Made| {
        json!({"authentication": {"type": "selfSigned",
            "x509Thumbprint": {"primaryThumbprint": p.sha1(), "secondaryThumbprint": s.sha256().to_lowercase()}}})
    };
    assert_eq!(put(&hub, "/devices/ss1", auth(&good, &expired)).await.0, 200);
    // Primary by SHA-1, secondary by SHA-256 in lower case.
    let mut c = connected(&hub, "ss1", None, &good).await;
    let pkid = c.publish("devices/ss1/messages/events/", "hi", QoS::AtLeastOnce).await;
    c.puback(pkid).await;
    assert_eq!(hub.events("ss1", None).await["received"], 1);
    drop(c);
    let no = Some(ConnectReturnCode::NotAuthorized);
    assert_eq!(connect_with(&hub, "ss1", None, &other).await, no, "another certificate");
    assert_eq!(refused(&hub, "cert_thumbprint").await, 1.0);
    assert_eq!(connect_with(&hub, "ss1", None, &expired).await, no, "expired");
    assert_eq!(refused(&hub, "cert_expired").await, 1.0);
    assert_eq!(put_if(&hub, "/devices/ss1", auth(&early, &wrong_cn)).await.0, 200);
    assert_eq!(connect_with(&hub, "ss1", None, &early).await, no, "not yet valid");
    assert_eq!(refused(&hub, "cert_not_yet_valid").await, 1.0);
    assert_eq!(connect_with(&hub, "ss1", None, &wrong_cn).await, no, "CN is not the device id");
    assert_eq!(refused(&hub, "cert_subject").await, 1.0);
    // No certificate at all: the empty password is no token either.
    let user = hub_username(&hub.info.hostname, "ss1", None, None);
    assert_eq!(hub.mqtt().await.connect("ss1", &user, "", true, 60).await, no, "no certificate");
    assert_eq!(refused(&hub, "cert_missing").await, 1.0);

    // HTTPS device requests: no Authorization header, the certificate in the TLS handshake.
    assert_eq!(put_if(&hub, "/devices/ss1", auth(&good, &expired)).await.0, 200);
    let https = |cert: &Made| {
        let tls = hub.tls_with_cert(vec![cert.der.clone()], cert.key_der());
        reqwest::Client::builder()
            .tls_backend_preconfigured(rustls::ClientConfig::clone(&tls))
            .resolve("localhost", hub.info.https_addr)
            .build()
            .unwrap()
    };
    let url = hub.url("/devices/ss1/messages/events");
    let sent = https(&good).post(&url).body("over https").send().await.unwrap();
    assert_eq!(sent.status(), 204);
    assert_eq!(hub.events("ss1", None).await["received"], 2);
    let sent = https(&other).post(&url).body("no").send().await.unwrap();
    assert_eq!(sent.status(), 401);
    let received = https(&good).get(hub.url("/devices/ss1/messages/deviceBound")).send().await.unwrap();
    assert_eq!(received.status(), 204, "nothing queued");

    // A SAS device presenting a certificate still authenticates by its token, and only by it.
    let key = hub.create_device("sas1").await;
    let cert = self_signed("sas1", 2020, 2090);
    let tls = hub.tls_with_cert(vec![cert.der.clone()], cert.key_der());
    let user = hub_username(&hub.info.hostname, "sas1", None, None);
    let token = hub.device_token("sas1", None, &key, future(600));
    assert_eq!(
        hub.mqtt_over(tls.clone()).await.connect("sas1", &user, &token, true, 60).await,
        Some(ConnectReturnCode::Success)
    );
    assert_eq!(hub.mqtt_over(tls).await.connect("sas1", &user, "", true, 60).await, no);
    assert_eq!(refused(&hub, "bad_credentials").await, 1.0);
    // And an X.509 device cannot use a key token: it has none that signs.
    let forged = hub.device_token("ss1", None, &key, future(600));
    assert_eq!(
        hub.mqtt().await.connect("ss1", &hub_username(&hub.info.hostname, "ss1", None, None), &forged, true, 60).await,
        no
    );
    assert_eq!(refused(&hub, "cert_missing").await, 2.0);
}

async fn connected(hub: &Api, device: &str, module: Option<&str>, cert: &Made) -> common::MqttClient {
    let tls = hub.tls_with_cert(vec![cert.der.clone()], cert.key_der());
    let client_id = module.map_or(device.to_owned(), |m| format!("{device}/{m}"));
    let user = hub_username(&hub.info.hostname, device, module, None);
    let mut c = hub.mqtt_over(tls).await;
    assert_eq!(c.connect(&client_id, &user, "", true, 60).await, Some(ConnectReturnCode::Success), "{device}");
    c
}

async fn upload(hub: &Api, name: &str, pem: &str, verified: bool) -> (u16, Value) {
    put(hub, &format!("/certificates/{name}"), json!({"properties": {"certificate": pem, "isVerified": verified}}))
        .await
}

#[tokio::test]
async fn ca_devices_need_a_verified_ca_with_proof_of_possession_and_lose_it_with_the_ca() {
    let mut hub = TestHub::start().await;
    let root = ca("fleetsim test root");
    let stranger = ca("someone else's root");
    let dev = signed("cad1", 2020, 2090, &root);
    let module = signed("m1", 2020, 2090, &root);
    let expired = signed("cad1", 2020, 2021, &root);
    let foreign = signed("cad1", 2020, 2090, &stranger);
    assert_eq!(put(&hub, "/devices/cad1", json!({"authentication": {"type": "certificateAuthority"}})).await.0, 200);
    assert_eq!(
        put(&hub, "/devices/cad1/modules/m1", json!({"authentication": {"type": "certificateAuthority"}})).await.0,
        200
    );
    let no = Some(ConnectReturnCode::NotAuthorized);
    assert_eq!(connect_with(&hub, "cad1", None, &dev).await, no, "no CA yet");

    // Uploaded, not verified: still refused.
    let (status, c) = upload(&hub, "root", &root.0.pem, false).await;
    assert_eq!(status, 201, "{c}");
    assert_eq!(c["properties"]["isVerified"], false);
    assert_eq!(c["properties"]["thumbprint"], json!(root.0.sha1()));
    assert_eq!(c["properties"]["subject"], "CN=fleetsim test root");
    assert_eq!(c["type"], "Microsoft.Devices/IotHubs/Certificates");
    assert!(c["properties"]["expiry"].as_str().unwrap().ends_with(" GMT"), "{c}");
    assert_eq!(connect_with(&hub, "cad1", None, &dev).await, no, "CA not verified");
    assert_eq!(refused(&hub, "cert_untrusted").await, 2.0);

    // Proof of possession: a certificate with the code as CN, signed by the CA.
    let etag = c["etag"].as_str().unwrap().to_owned();
    let (status, _, code) = hub
        .rest_as("iothubowner", "POST", "/certificates/root/generateVerificationCode", None, &[("if-match", &etag)])
        .await;
    assert_eq!(status, 200, "{code}");
    let nonce = code["properties"]["verificationCode"].as_str().unwrap().to_owned();
    let etag = code["etag"].as_str().unwrap().to_owned();
    let wrong = signed(&nonce, 2020, 2090, &stranger);
    let (status, h, e) = hub
        .rest_as(
            "iothubowner",
            "POST",
            "/certificates/root/verify",
            Some(json!({"certificate": wrong.pem})),
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!((status, h["iothub-errorcode"].to_str().unwrap()), (400, "CertificateVerificationFailed"), "{e}");
    let proof = signed(&nonce, 2020, 2090, &root);
    let (status, _, v) = hub
        .rest_as(
            "iothubowner",
            "POST",
            "/certificates/root/verify",
            Some(json!({"certificate": proof.pem})),
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!((status, &v["properties"]["isVerified"]), (200, &json!(true)), "{v}");

    let mut c = connected(&hub, "cad1", None, &dev).await;
    let pkid = c.publish("devices/cad1/messages/events/", "x", QoS::AtLeastOnce).await;
    c.puback(pkid).await;
    assert_eq!(hub.events("cad1", None).await["received"], 1);
    drop(c);
    let _m = connected(&hub, "cad1", Some("m1"), &module).await;
    assert_eq!(connect_with(&hub, "cad1", None, &expired).await, no, "expired");
    assert_eq!(refused(&hub, "cert_expired").await, 1.0);
    assert_eq!(connect_with(&hub, "cad1", None, &foreign).await, no, "another CA");
    assert_eq!(refused(&hub, "cert_untrusted").await, 3.0);
    assert_eq!(connect_with(&hub, "cad1", None, &module).await, no, "CN of another identity");
    assert_eq!(refused(&hub, "cert_subject").await, 1.0);
    let (_, _, list) = hub.rest("GET", "/certificates", None).await;
    assert_eq!(list["value"].as_array().map(Vec::len), Some(1), "{list}");

    // The store keeps it verified.
    hub.stop().await;
    let TestHub { dir, .. } = hub;
    let mut hub = TestHub::start_in(dir, |_| {}).await;
    let (_, _, c) = hub.rest("GET", "/certificates/root", None).await;
    assert_eq!(c["properties"]["isVerified"], true, "{c}");
    let _ = connected(&hub, "cad1", None, &dev).await;

    // Removed: refused from the next connect.
    let (status, _, _) = hub.rest_as("iothubowner", "DELETE", "/certificates/root", None, &[("if-match", "*")]).await;
    assert_eq!(status, 200);
    assert_eq!(connect_with(&hub, "cad1", None, &dev).await, no, "CA removed");
    assert_eq!(refused(&hub, "cert_untrusted").await, 1.0);
    let (status, _, _) = hub.rest("GET", "/certificates/root", None).await;
    assert_eq!(status, 404);
    hub.stop().await;
    let TestHub { dir, .. } = hub;
    let hub = TestHub::start_in(dir, |_| {}).await;
    let (_, _, list) = hub.rest("GET", "/certificates", None).await;
    assert_eq!(list["value"], json!([]), "the deletion is kept");
}

#[tokio::test]
async fn without_proof_of_possession_an_upload_is_verified_and_websockets_take_certificates_too() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let hub = TestHub::start_with(|c| c.behaviour.ca_proof_of_possession = false).await;
    let root = ca("quick root");
    let (status, c) = upload(&hub, "quick", &root.0.pem, false).await;
    assert_eq!((status, &c["properties"]["isVerified"]), (201, &json!(true)), "{c}");
    assert_eq!(put(&hub, "/devices/wsd", json!({"authentication": {"type": "certificateAuthority"}})).await.0, 200);
    let dev = signed("wsd", 2020, 2090, &root);
    // Bad uploads: 400 naming what is wrong, nothing stored.
    let (status, e) = upload(&hub, "junk", "not a certificate", false).await;
    assert_eq!(status, 400, "{e}");
    let (status, e) = upload(&hub, "bad/name", &root.0.pem, false).await;
    assert!(status == 400 || status == 404, "{status} {e}");

    // MQTT over WebSockets on the HTTPS port, with the device certificate in the TLS handshake.
    let mut req = format!("wss://localhost:{}/$iothub/websocket", hub.info.https_port).into_client_request().unwrap();
    req.headers_mut().insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(hub.info.https_addr).await.unwrap();
    let tls = hub.tls_with_cert(vec![dev.der.clone(), root.0.der.clone()], dev.key_der());
    let connector = tokio_tungstenite::Connector::Rustls(Arc::clone(&tls));
    let (mut ws, _) = tokio_tungstenite::client_async_tls_with_config(req, tcp, None, Some(connector)).await.unwrap();
    let mut connect = rumqttc::mqttbytes::v4::Connect::new("wsd");
    connect.set_login(hub_username(&hub.info.hostname, "wsd", None, None), "");
    let mut buf = bytes::BytesMut::new();
    rumqttc::mqttbytes::v4::Packet::Connect(connect).write(&mut buf, 1 << 20).unwrap();
    ws.send(Message::Binary(buf.freeze())).await.unwrap();
    let reply = tokio::time::timeout(common::WAIT, ws.next()).await.unwrap().unwrap().unwrap();
    let mut data = bytes::BytesMut::from(&reply.into_data()[..]);
    match rumqttc::mqttbytes::v4::Packet::read(&mut data, 1 << 20).unwrap() {
        rumqttc::mqttbytes::v4::Packet::ConnAck(a) => assert_eq!(a.code, ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert_eq!(hub.metric("fleetsim_hub_connections{kind=\"hub\"}").await, 1.0);
}
