//! The Azure IoT device protocol as plain data: SAS tokens, connection strings, MQTT usernames,
//! topics and property bags, twin documents and DPS messages.
//!
//! Both sides of fleetsim (the simulated devices and the hub emulator) speak through this module,
//! so a disagreement between them is a bug in one place, not two. Nothing here does I/O or reads
//! the clock implicitly, which keeps it unit-testable and fuzzable.

pub mod connection_string;
pub mod dps;
pub mod dtdl;
pub mod encoding;
pub mod https_headers;
pub mod property_bag;
pub mod route;
pub mod route_condition;
pub mod sas;
pub mod sequence;
pub mod time;
pub mod topic;
pub mod twin;
pub mod username;
