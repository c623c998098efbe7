//! A simulated identity's life: open a transport, speak MQTT, behave as its scenario says.
//! `behaviour` is the device's mind (no I/O), `runtime` its body (connection, timers, retries).

pub mod behaviour;
pub mod failures;
pub mod mqtt;
pub mod outbox;
pub mod ramp;
pub mod recovery;
pub mod reported;
pub mod runtime;
pub mod transport;
