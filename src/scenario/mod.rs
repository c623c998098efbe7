//! Scenario files: device templates (count, id pattern, provisioning, transport, and behaviour:
//! telemetry, properties, commands, writable properties, reboot, modules), validated as a whole
//! before anything connects, then expanded into identities.

pub mod edge;
pub mod model;
pub mod models;
pub mod schema;
pub mod value;
