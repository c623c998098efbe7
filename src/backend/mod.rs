//! A back end's view of a hub, over AMQP 1.0 on `fe2o3-amqp`'s client: reading the
//! Event Hubs-compatible endpoint (`consumer.rs`) and sending cloud-to-device messages with their
//! feedback (`c2d.rs`), against real Azure or the emulator alike. `amqp.rs` is the connection
//! with claims-based security both use; `target.rs` the Event Hubs connection string.
//! Used by `fleet` (the CI end-to-end check) and `tools` (`tail`, `c2d`); knows nothing of the
//! emulator.

pub mod amqp;
pub mod c2d;
pub mod consumer;
pub mod target;
