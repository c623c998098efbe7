//! A simulated identity's life: get credentials, open a transport, behave as its scenario says.
//! `spec` is what an identity is given; `behaviour` (the scenario's mind) and `core` (its
//! session rules) do no I/O; `link/` are the transports under them; `session` is one
//! connection's loop and `runtime` the identity's whole life (credentials, ramp, backoff,
//! reboots, renewal); `edge` is the fleet acting as a simulated Edge device's Edge hub; `view`
//! is what the web console sees of each identity.

pub mod behaviour;
pub mod core;
pub mod credentials;
pub mod edge;
pub mod failures;
pub mod link;
pub mod outbox;
pub mod ramp;
pub mod recovery;
pub mod reported;
pub mod runtime;
pub mod session;
pub mod spec;
pub mod view;
