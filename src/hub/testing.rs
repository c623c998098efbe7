//! Unit-test support for the hub's sans-I/O parts (`devices.rs`, the MQTT sessions): a hub state
//! without listeners (its keys in a temp dir), identities, signed tokens, CONNECT packets, and the
//! packets a session wrote to its `Wire`. Time is the hub's clock, so `#[tokio::test(start_paused = true)]` tests move it.

use std::sync::Arc;

use rumqttc::mqttbytes::QoS;
use rumqttc::mqttbytes::v4::{Connect, Packet, Publish, Subscribe};

use crate::hub::config::HubConfig;
use crate::hub::mqtt::contract::Wire;
use crate::hub::registry::Record;
use crate::hub::state::{Hub, HubState};
use crate::iot::sas::{Key, sign_token};
use crate::iot::time::unix_secs;

/// A hub state and the directory holding its keys (removed on drop).
pub struct Bench {
    pub hub: Hub,
    _dir: tempfile::TempDir,
}

pub fn bench(adjust: impl FnOnce(&mut HubConfig)) -> Bench {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut config = HubConfig { data_dir: dir.path().to_owned(), ..Default::default() };
    adjust(&mut config);
    let secrets = crate::hub::secrets::Secrets::load_or_create(dir.path(), &config.keys).expect("keys");
    let hub: Hub = Arc::new(HubState::new(&config, secrets).expect("hub state"));
    Bench { hub, _dir: dir }
}

/// Creates a device (or module) with a fixed key, returned.
pub fn identity(hub: &HubState, device: &str, module: Option<&str>) -> Key {
    let key = Key::from_bytes(format!("key of {device}/{module:?}").into_bytes());
    let record = Record::new(key.clone(), Key::generate());
    hub.registry.create(device, module, record, crate::hub::clock::wall()).expect("a new identity");
    key
}

/// A SAS token for `resource` valid for `secs` from the hub's clock.
pub fn token(resource: &str, key: &Key, secs: u64) -> String {
    sign_token(resource, key, unix_secs(crate::hub::clock::wall()) + secs, None)
}

pub fn connect(client_id: &str, username: &str, password: &str, clean: bool) -> Connect {
    let mut c = Connect::new(client_id);
    c.set_login(username, password);
    c.clean_session = clean;
    c
}

pub fn subscribe(pkid: u16, filters: &[&str]) -> Packet {
    let mut s = Subscribe::new(filters[0], QoS::AtLeastOnce);
    for f in &filters[1..] {
        s.add((*f).to_owned(), QoS::AtLeastOnce);
    }
    s.pkid = pkid;
    Packet::Subscribe(s)
}

pub fn publish(topic: &str, payload: &'static [u8], qos: QoS, pkid: u16) -> Packet {
    let mut p = Publish::new(topic, qos, payload);
    p.pkid = pkid;
    Packet::Publish(p)
}

/// Every packet the session wrote since the last call.
pub fn written(wire: &mut Wire) -> Vec<Packet> {
    let mut out = Vec::new();
    while !wire.out.is_empty() {
        out.push(Packet::read(&mut wire.out, usize::MAX).expect("the hub writes whole, valid packets"));
    }
    out
}

/// The publishes among `packets`, as (topic, payload text).
pub fn publishes(packets: &[Packet]) -> Vec<(String, String)> {
    packets
        .iter()
        .filter_map(|p| match p {
            Packet::Publish(p) => Some((p.topic.clone(), String::from_utf8_lossy(&p.payload).into_owned())),
            _ => None,
        })
        .collect()
}
