//! The IoT Edge workload API, as far as module clients use it: the trust bundle and signing with
//! a module's key. With it, module code that calls `create_from_edge_environment()` (Python) or
//! `ModuleClient.fromEnvironment` (Node) runs unchanged against the emulator, given the
//! `IOTEDGE_*` variables `fleetsim edge env` prints.
//!
//! Served over a Unix socket in the data dir (`workload.sock`), as IoT Edge serves it
//! (`unix:///var/run/iotedge/workload.sock`). Routes (Azure/iotedge, edgelet workload API):
//! - `GET /trust-bundle?api-version=...` → `{"certificate": "<PEM>"}`: the CA the hub's server
//!   certificate chains to;
//! - `POST /modules/{moduleId}/genid/{generationId}/sign?api-version=...` with
//!   `{"keyId": "primary"|"secondary", "algo": "HMACSHA256", "data": "<base64>"}` →
//!   `{"digest": "<base64 HMAC-SHA256 of the decoded data with the module's key>"}`. The module is
//!   found by its id and generation id (one socket serves every Edge device of the emulator, where
//!   a real device's daemon serves only its own modules); 404 when none matches, 400 for a bad
//!   body, key id or algorithm, or a missing `api-version`.

use std::path::{Path, PathBuf};

use axum::Json;
use axum::Router;
use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine;
use serde_json::{Value, json};

use super::state::Hub;

/// Longest socket path the platform takes (`sun_path` is 108 bytes on Linux, with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Where the workload socket lives for a data dir.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join("workload.sock")
}

/// `IOTEDGE_WORKLOADURI` for a socket path.
pub fn uri(socket: &Path) -> String {
    format!("unix://{}", socket.display())
}

/// Binds the workload socket (replacing a stale one from an earlier run). `None`, with a warning,
/// when the path is too long for a Unix socket or cannot be bound: the rest of the hub runs.
pub fn bind(socket: &Path) -> Option<tokio::net::UnixListener> {
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        tracing::warn!(path = %socket.display(), "the data dir's path is too long for the IoT Edge workload socket; it is not served");
        return None;
    }
    let _ = std::fs::remove_file(socket);
    match tokio::net::UnixListener::bind(socket) {
        Ok(l) => Some(l),
        Err(e) => {
            tracing::warn!(path = %socket.display(), "cannot serve the IoT Edge workload socket: {e}");
            None
        }
    }
}

struct Workload {
    hub: Hub,
    ca_pem: String,
}

type Shared = std::sync::Arc<Workload>;

/// Serves the workload API on `listener` until the hub stops.
pub async fn serve(hub: Hub, listener: tokio::net::UnixListener, ca_pem: String) {
    let shutdown = hub.shutdown.clone();
    let state: Shared = std::sync::Arc::new(Workload { hub, ca_pem });
    let app = Router::new()
        .route("/trust-bundle", get(trust_bundle))
        .route("/modules/{module}/genid/{genid}/sign", post(sign))
        .with_state(state);
    let served = axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await });
    if let Err(e) = served.await {
        tracing::warn!("the IoT Edge workload socket stopped: {e}");
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({"message": message.into()}))).into_response()
}

fn has_api_version(query: &Option<String>) -> bool {
    query.as_deref().is_some_and(|q| q.split('&').any(|p| p.to_ascii_lowercase().starts_with("api-version=")))
}

async fn trust_bundle(State(w): State<Shared>, RawQuery(query): RawQuery) -> Response {
    if !has_api_version(&query) {
        return error(StatusCode::BAD_REQUEST, "api-version is required");
    }
    Json(json!({"certificate": w.ca_pem})).into_response()
}

async fn sign(
    State(w): State<Shared>,
    UrlPath((module, genid)): UrlPath<(String, String)>,
    RawQuery(query): RawQuery,
    body: axum::body::Bytes,
) -> Response {
    if !has_api_version(&query) {
        return error(StatusCode::BAD_REQUEST, "api-version is required");
    }
    let Ok(request) = serde_json::from_slice::<Value>(&body) else {
        return error(StatusCode::BAD_REQUEST, "the body is not JSON");
    };
    let slot = match request.get("keyId").and_then(Value::as_str) {
        Some("primary") => 0,
        Some("secondary") => 1,
        _ => return error(StatusCode::BAD_REQUEST, "keyId must be primary or secondary"),
    };
    if request.get("algo").and_then(Value::as_str) != Some("HMACSHA256") {
        return error(StatusCode::BAD_REQUEST, "algo must be HMACSHA256");
    }
    let Some(data) = request
        .get("data")
        .and_then(Value::as_str)
        .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
    else {
        return error(StatusCode::BAD_REQUEST, "data must be base64");
    };
    let key =
        w.hub.registry.all().into_iter().filter(|i| i.module_id.as_deref() == Some(module.as_str())).find_map(|i| {
            let st = i.lock();
            (st.record.generation_id == genid && !st.removed).then(|| st.record.keys[slot].clone())
        });
    match key {
        Some(k) => Json(json!({"digest": k.sign(&data)})).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("module {module} with generation id {genid} not found")),
    }
}
