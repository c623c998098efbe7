//! A simulated identity's life: get credentials, open a transport, behave as its scenario says.
//! `spec` is what an identity is given, `behaviour` the device's mind (no I/O), `runtime` its
//! body (credentials, ramp, connection, timers, retries).

pub mod behaviour;
pub mod failures;
pub mod outbox;
pub mod ramp;
pub mod recovery;
pub mod reported;
pub mod runtime;
pub mod spec;
