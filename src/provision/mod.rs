//! Getting credentials for a simulated identity: DPS registration (HTTPS or MQTT), and the
//! service-API calls that create devices, modules and enrollments where a scenario needs them.

pub mod dps;
pub mod registry;
