//! Device-side connections to the hub and DPS, below both `device` and `provision`: opening a byte
//! stream (TLS, or MQTT over WebSockets on top) and a lean MQTT 3.1.1 client on it; and the
//! device REST API over HTTPS.

pub mod https;
pub mod mqtt;
pub mod transport;
