//! The web console: a JSON API (`/api/v1/...`) and the single-page app that uses it, served on the
//! metrics listener of `fleetsim run` and of `fleetsim hub`. `fleet` builds a [`Console`] from what
//! it already has (metrics, the identities' views, the service client, the embedded hub) and merges
//! [`router`] into its own; a standalone emulator gets one from [`for_hub`], with the emulator's
//! routes only. Every route, shape, unit and error is in docs/console.md.
//!
//! The console costs the hot path nothing beyond the views (`device::view`): the time series is
//! sampled once a second from the Prometheus handles by one task, and pages of the devices table
//! are range walks of an ordered map.

mod assets;
mod emulator;
mod fleet_api;
pub mod series;
pub mod status;

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Instant, SystemTime};

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::config::ci::CiConfig;
use crate::device::spec::Shared;
use crate::device::view::Views;
use crate::hub::state::Hub;

/// What the console reads and acts on: a fleet, an emulator, or both (a fleet that embeds one).
pub struct Console {
    /// The fleet, for `fleetsim run`; `None` on a standalone emulator (`fleetsim hub`).
    pub fleet: Option<Fleet>,
    /// The emulator, embedded or standalone, for the emulator view.
    pub hub: Option<Hub>,
    pub started: Instant,
    pub started_at: SystemTime,
    pub series: series::Series,
}

/// The fleet's side of the console.
pub struct Fleet {
    pub shared: Arc<Shared>,
    pub views: Arc<Views>,
    /// Identities the fleet runs now.
    pub total: Arc<AtomicUsize>,
    /// CI mode's settings, for the thresholds and where the run stands.
    pub ci: Option<CiConfig>,
}

impl Console {
    pub fn new(fleet: Option<Fleet>, hub: Option<Hub>) -> Console {
        Console { fleet, hub, started: Instant::now(), started_at: SystemTime::now(), series: Default::default() }
    }

    /// The fleet, or 404 `NoFleet` on a standalone emulator.
    pub fn fleet(&self) -> Result<&Fleet, ApiError> {
        self.fleet.as_ref().ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "NoFleet",
                "this is a standalone emulator (`fleetsim hub`): it runs no fleet",
            )
        })
    }
}

/// The console of a standalone emulator (`fleetsim hub`): the app, the overview, the time series
/// and the emulator's routes, sampled until the hub shuts down.
pub fn for_hub(hub: Hub) -> Router {
    let stop = hub.shutdown.clone();
    let c = Arc::new(Console::new(None, Some(hub)));
    tokio::spawn(series::run(c.clone(), stop));
    router(c)
}

pub type State = Arc<Console>;

/// An API error as JSON: `{"status": 404, "error": "DeviceNotFound", "message": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, code, message: message.into() }
    }

    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "BadRequest", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"status": self.status.as_u16(), "error": self.code, "message": self.message});
        (self.status, Json(body)).into_response()
    }
}

pub type ApiResult = Result<Response, ApiError>;

/// The console's routes: the app at `/`, its assets, the JSON API under `/api/v1/`, and JSON 404s
/// for any other `/api/` path.
pub fn router(console: State) -> Router {
    Router::new()
        .merge(assets::routes())
        .merge(fleet_api::routes())
        .merge(emulator::routes())
        .route(
            "/api/{*rest}",
            axum::routing::any(|| async { ApiError::new(StatusCode::NOT_FOUND, "NoSuchRoute", "no such API route") }),
        )
        .with_state(console)
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// A JSON request body, or a 400 naming what is wrong with it.
pub fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return serde_json::from_slice(b"{}").map_err(|e| ApiError::bad_request(format!("a JSON body is needed: {e}")));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("bad request body: {e}")))
}
