//! The service REST API's registry semantics: generated keys, 409 on create-existing, etags,
//! deletion, listing, statistics, query paging, permissions per policy and api-version.

use fleetsim_testkit as common;

use common::TestHub;
use serde_json::{Value, json};

#[tokio::test]
async fn identity_crud_follows_the_hub() {
    let hub = TestHub::start().await;
    let (status, _, dev) = hub.rest("PUT", "/devices/a1", Some(json!({"deviceId": "a1", "authentication": {"type": "sas", "symmetricKey": {"primaryKey": "", "secondaryKey": null}}}))).await;
    assert_eq!(status, 200);
    let pk = dev["authentication"]["symmetricKey"]["primaryKey"].as_str().unwrap();
    assert_eq!(base64_len(pk), 32, "generated keys are 32 bytes");
    assert_eq!(dev["status"], "enabled");
    assert_eq!(dev["connectionStateUpdatedTime"], "0001-01-01T00:00:00Z");

    let (status, headers, body) = hub.rest("PUT", "/devices/a1", Some(json!({"deviceId": "a1"}))).await;
    assert_eq!((status, headers["iothub-errorcode"].to_str().unwrap()), (409, "DeviceAlreadyExists"));
    assert!(body["Message"].as_str().unwrap().starts_with("ErrorCode:DeviceAlreadyExists;"));

    let stale = [("if-match", "\"bm90LXRoZS1ldGFn\"")];
    let (status, _, _) = hub
        .rest_as("iothubowner", "PUT", "/devices/a1", Some(json!({"deviceId": "a1", "status": "disabled"})), &stale)
        .await;
    assert_eq!(status, 412);
    let etag = format!("\"{}\"", dev["etag"].as_str().unwrap());
    let (status, _, updated) = hub
        .rest_as(
            "iothubowner",
            "PUT",
            "/devices/a1",
            Some(json!({"deviceId": "a1", "status": "disabled"})),
            &[("if-match", &etag)],
        )
        .await;
    assert_eq!((status, updated["status"].as_str()), (200, Some("disabled")));
    assert_eq!(updated["authentication"]["symmetricKey"]["primaryKey"], pk, "keys kept when not given");
    assert_ne!(updated["etag"], dev["etag"]);

    let (status, _, m) =
        hub.rest("PUT", "/devices/a1/modules/mod1", Some(json!({"moduleId": "mod1", "deviceId": "a1"}))).await;
    assert_eq!((status, m["moduleId"].as_str()), (200, Some("mod1")));
    let (status, headers, _) = hub.rest("PUT", "/devices/a1/modules/mod1", Some(json!({}))).await;
    assert_eq!((status, headers["iothub-errorcode"].to_str().unwrap()), (409, "ModuleAlreadyExistsOnDevice"));
    let (status, _, _) = hub.rest("PUT", "/devices/nope/modules/m", Some(json!({}))).await;
    assert_eq!(status, 404);
    let (_, _, mods) = hub.rest("GET", "/devices/a1/modules", None).await;
    assert_eq!(mods.as_array().unwrap().len(), 1);

    for id in ["b1", "b2", "b3"] {
        hub.create_device(id).await;
    }
    let (_, _, list) = hub.rest("GET", "/devices?top=2", None).await;
    assert_eq!(
        list.as_array().unwrap().iter().map(|d| d["deviceId"].as_str().unwrap()).collect::<Vec<_>>(),
        ["a1", "b1"]
    );
    let (_, _, stats) = hub.rest("GET", "/statistics/devices", None).await;
    assert_eq!(stats, json!({"totalDeviceCount": 4, "enabledDeviceCount": 3, "disabledDeviceCount": 1}));

    let (status, _, _) = hub.rest("DELETE", "/devices/a1", None).await;
    assert_eq!(status, 204);
    let (status, headers, _) = hub.rest("GET", "/devices/a1/modules/mod1", None).await;
    assert_eq!((status, headers["iothub-errorcode"].to_str().unwrap()), (404, "ModuleNotFound"));
    let (status, headers, _) = hub.rest("GET", "/devices/a1", None).await;
    assert_eq!((status, headers["iothub-errorcode"].to_str().unwrap()), (404, "DeviceNotFound"));
    let (status, _, _) = hub.rest("PUT", "/devices/bad%2Fid", Some(json!({}))).await;
    assert_eq!(status, 400);
}

fn base64_len(s: &str) -> usize {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s).unwrap().len()
}

#[tokio::test]
async fn twins_replace_and_query_pages() {
    let hub = TestHub::start().await;
    for i in 0..5 {
        hub.create_device(&format!("q{i}")).await;
    }
    let (status, _, twin) = hub
        .rest("PUT", "/twins/q0", Some(json!({"tags": {"t": 1}, "properties": {"desired": {"a": 1, "b": 2}}})))
        .await;
    assert_eq!(status, 200);
    assert_eq!(twin["properties"]["desired"]["$version"], 2);
    let (_, _, twin) = hub.rest("PUT", "/twins/q0", Some(json!({"properties": {"desired": {"b": 3}}}))).await;
    assert_eq!(twin["tags"], json!({}));
    assert!(twin["properties"]["desired"].get("a").is_none());
    let (status, _, _) = hub.rest("PATCH", "/twins/q0", Some(json!({"properties": {"reported": {"x": 1}}}))).await;
    assert_eq!(status, 400, "the service cannot write reported properties");
    let (status, _, _) = hub.rest("PATCH", "/twins/q0", Some(json!({"properties": {"desired": {"bad key": 1}}}))).await;
    assert_eq!(status, 400);

    let page = |cont: Option<String>| {
        let mut h = vec![("x-ms-max-item-count", "2".to_owned())];
        if let Some(c) = cont {
            h.push(("x-ms-continuation", c));
        }
        h
    };
    let mut seen = Vec::new();
    let mut cont = None;
    for _ in 0..5 {
        let headers = page(cont.clone());
        let hdrs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let (status, h, items) = hub
            .rest_as("service", "POST", "/devices/query", Some(json!({"query": "SELECT * FROM devices"})), &hdrs)
            .await;
        assert_eq!(status, 200);
        seen.extend(items.as_array().unwrap().iter().map(|t| t["deviceId"].as_str().unwrap().to_owned()));
        cont = h.get("x-ms-continuation").map(|v| v.to_str().unwrap().to_owned());
        if cont.is_none() {
            break;
        }
    }
    assert_eq!(seen, ["q0", "q1", "q2", "q3", "q4"]);
    // WHERE over tags and ids, paged like the rest.
    let tags = json!({"tags": {"odd": true}});
    for id in ["q1", "q3"] {
        let (status, _, _) =
            hub.rest_as("iothubowner", "PATCH", &format!("/twins/{id}"), Some(tags.clone()), &[]).await;
        assert_eq!(status, 200);
    }
    let q = json!({"query": "SELECT * FROM devices WHERE tags.odd = true OR deviceId = 'q4'"});
    let (status, h, items) =
        hub.rest_as("service", "POST", "/devices/query", Some(q.clone()), &[("x-ms-max-item-count", "2")]).await;
    assert_eq!(status, 200, "{items}");
    let ids: Vec<&str> = items.as_array().unwrap().iter().map(|t| t["deviceId"].as_str().unwrap()).collect();
    assert_eq!(ids, ["q1", "q3"]);
    let cont = h.get("x-ms-continuation").expect("a third match remains").to_str().unwrap().to_owned();
    let (_, h, items) = hub
        .rest_as(
            "service",
            "POST",
            "/devices/query",
            Some(q),
            &[("x-ms-max-item-count", "2"), ("x-ms-continuation", &cont)],
        )
        .await;
    assert_eq!(items.as_array().unwrap()[0]["deviceId"], "q4");
    assert!(h.get("x-ms-continuation").is_none());
    let (status, _, body) =
        hub.rest("POST", "/devices/query", Some(json!({"query": "SELECT deviceId FROM devices"}))).await;
    assert_eq!(status, 400, "projections are not emulated and say so: {body}");
}

#[tokio::test]
async fn policies_grant_only_their_permissions() {
    let hub = TestHub::start().await;
    hub.create_device("p1").await;
    let cases: [(&str, &str, &str, Option<Value>, u16); 8] = [
        ("registryRead", "GET", "/devices/p1", None, 200),
        ("registryRead", "PUT", "/devices/p2", Some(json!({})), 401),
        ("registryReadWrite", "PUT", "/devices/p2", Some(json!({})), 200),
        ("registryReadWrite", "GET", "/twins/p1", None, 401),
        ("service", "GET", "/twins/p1", None, 200),
        ("service", "GET", "/devices/p1", None, 401),
        ("device", "GET", "/devices/p1", None, 401),
        ("provisioningserviceowner", "GET", "/devices/p1", None, 401),
    ];
    for (policy, method, path, body, want) in cases {
        let (status, _, resp) = hub.rest_as(policy, method, path, body, &[]).await;
        assert_eq!(status, want, "{policy} {method} {path}: {resp}");
    }
    // No token, an expired token, a token for another host, no api-version.
    let url = hub.url("/devices/p1");
    assert_eq!(hub.http.get(&url).send().await.unwrap().status(), 401);
    let expired = fleetsim::iot::sas::sign_token("localhost", &hub.policy_key("iothubowner"), 1, Some("iothubowner"));
    assert_eq!(hub.http.get(&url).header("authorization", expired).send().await.unwrap().status(), 401);
    let elsewhere = fleetsim::iot::sas::sign_token(
        "other.example",
        &hub.policy_key("iothubowner"),
        common::future(60),
        Some("iothubowner"),
    );
    assert_eq!(hub.http.get(&url).header("authorization", elsewhere).send().await.unwrap().status(), 401);
    let no_version = format!("https://localhost:{}/devices/p1", hub.info.https_port);
    let r = hub.http.get(no_version).header("authorization", hub.service_token("iothubowner")).send().await.unwrap();
    assert_eq!(
        (r.status().as_u16(), r.headers()["iothub-errorcode"].to_str().unwrap()),
        (400, "InvalidProtocolVersion")
    );
    // A host with the port, as the Python service SDK signs it, is the same hub.
    let with_port = fleetsim::iot::sas::sign_token(
        &format!("localhost:{}", hub.info.https_port),
        &hub.policy_key("iothubowner"),
        common::future(60),
        Some("iothubowner"),
    );
    assert_eq!(hub.http.get(&url).header("authorization", with_port).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn keys_ca_and_scope_survive_a_restart() {
    let mut first = TestHub::start().await;
    let info = first.info.clone();
    let ca = std::fs::read(&info.ca_file).unwrap();
    first.stop().await;
    let dir = std::mem::replace(&mut first.dir, tempfile::tempdir().unwrap());
    let second = TestHub::start_in(dir, |_| {}).await;
    assert_eq!(second.info.id_scope, info.id_scope);
    assert_eq!(second.info.group_key, info.group_key);
    assert_eq!(
        second.info.service_connection_string.split(';').nth(2),
        info.service_connection_string.split(';').nth(2)
    );
    assert_eq!(std::fs::read(&second.info.ca_file).unwrap(), ca);
    let on_disk: Value = serde_json::from_slice(&std::fs::read(second.dir.path().join("hub.json")).unwrap()).unwrap();
    for field in [
        "hostname",
        "mqtt_port",
        "https_port",
        "ca_file",
        "service_connection_string",
        "id_scope",
        "group_key",
        "metrics_url",
    ] {
        assert!(!on_disk[field].is_null(), "hub.json lacks {field}");
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(second.dir.path().join("hub.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "hub.json holds secrets and must be private");
    }
}
