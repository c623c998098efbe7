//! fleetsim: simulates fleets of Azure IoT devices and modules, and emulates IoT Hub + DPS locally.
//!
//! The layers, from the bottom: [`iot`] is the protocol as data (no I/O); [`hub`] is the emulator.
//! See ARCHITECTURE.md for where each flow lives.

pub mod backend;
pub mod cli;
pub mod client;
pub mod config;
pub mod console;
pub mod device;
pub mod fleet;
pub mod fsio;
#[doc(hidden)]
pub mod fuzzing;
pub mod httpserve;
pub mod hub;
pub mod iot;
pub mod metrics;
pub mod modelrepo;
pub mod problems;
pub mod provision;
pub mod scenario;
pub mod service;
pub mod sys;
pub mod tomlread;
pub mod tools;
pub mod validate;
