//! The HTTPS endpoint: one TLS listener serving the IoT Hub service API, the device API of HTTPS
//! devices (telemetry, C2D polling), the DPS device and service APIs, the emulator's own routes, and whatever routes the composition root adds (MQTT
//! over WebSockets, from the MQTT front end, which this one never imports); plus the plain-HTTP
//! metrics endpoint.

mod auth;
mod bulk;
mod certificates;
mod device_api;
mod dps_api;
mod emulator;
pub mod error;
mod normalize;
mod service;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post, put};
use tokio::net::TcpListener;

use super::state::Hub;
use crate::httpserve::{ConnectionBound, Limits};

/// Largest request body: a 128 KB method payload or a 32 KB twin, with room for JSON overhead.
const MAX_BODY: usize = 512 * 1024;

/// The HTTPS router: this front end's routes plus `extra` (routes of other front ends, merged by
/// the composition root), all behind the same request-line fold, token-scope check, body limit
/// and request counter.
pub fn router(hub: Hub, extra: Router<Hub>) -> Router {
    // Request-line variants are folded before routing (axum routes before `Router::layer`
    // middleware runs), so the routes sit behind the fold as the one fallback of an empty router.
    let routes = routes(hub, extra);
    Router::new().fallback_service(tower::ServiceExt::map_request(routes, normalize::request::<axum::body::Body>))
}

fn routes(hub: Hub, extra: Router<Hub>) -> Router {
    Router::new()
        .route("/devices", get(service::devices_list).post(bulk::update_registry))
        .route("/devices/query", post(service::query))
        .route("/devices/{id}", get(service::identity_get).put(service::identity_put).delete(service::identity_delete))
        .route("/devices/{id}/modules", get(service::modules_list))
        .route(
            "/devices/{id}/modules/{mid}",
            get(service::identity_get).put(service::identity_put).delete(service::identity_delete),
        )
        .route("/devices/{id}/commands", axum::routing::delete(service::c2d_purge))
        .route("/devices/{id}/applyConfigurationContent", post(service::apply_configuration))
        // The device API of HTTPS devices; `devicebound` is how the Node SDK spells it.
        .route("/devices/{id}/messages/events", post(device_api::send_event))
        .route("/devices/{id}/modules/{mid}/messages/events", post(device_api::send_event))
        .route("/devices/{id}/messages/deviceBound", get(device_api::receive))
        .route("/devices/{id}/messages/devicebound", get(device_api::receive))
        .route("/devices/{id}/messages/deviceBound/{etag}", axum::routing::delete(device_api::complete_or_reject))
        .route("/devices/{id}/messages/devicebound/{etag}", axum::routing::delete(device_api::complete_or_reject))
        .route("/devices/{id}/messages/deviceBound/{etag}/abandon", post(device_api::abandon))
        .route("/devices/{id}/messages/devicebound/{etag}/abandon", post(device_api::abandon))
        .route("/certificates", get(certificates::list))
        .route("/certificates/{name}", get(certificates::get).put(certificates::put).delete(certificates::delete))
        .route("/certificates/{name}/generateVerificationCode", post(certificates::generate_code))
        .route("/certificates/{name}/verify", post(certificates::verify))
        .route("/statistics/devices", get(service::statistics))
        .route("/statistics/service", get(service::service_statistics))
        .route(
            "/twins/{id}",
            get(service::twin_get_route).patch(service::twin_patch_route).put(service::twin_put_route),
        )
        .route("/twins/{id}/methods", post(service::method_route))
        .route(
            "/twins/{id}/modules/{mid}",
            get(service::twin_get_route).patch(service::twin_patch_route).put(service::twin_put_route),
        )
        .route("/twins/{id}/modules/{mid}/methods", post(service::method_route))
        .route("/{scope}/registrations/{reg}/register", put(dps_api::register))
        .route("/{scope}/registrations/{reg}/operations/{op}", get(dps_api::operation))
        .route("/{scope}/registrations/{reg}", post(dps_api::registration_status))
        .route(
            "/enrollments/{id}",
            put(dps_api::enrollment_put).get(dps_api::enrollment_get).delete(dps_api::enrollment_delete),
        )
        .route("/enrollmentGroups/{id}", put(dps_api::group_put).get(dps_api::group_get).delete(dps_api::group_delete))
        .route("/emulator/devices/{id}/messages/deviceBound", post(emulator::c2d_send))
        .route("/emulator/devices/{id}/messages/events", get(emulator::events_route))
        .route("/emulator/devices/{id}/modules/{mid}/messages/events", get(emulator::events_route))
        .route("/emulator/devices/{id}/modelcheck", get(emulator::model_check_route))
        .route("/emulator/devices/{id}/modules/{mid}/modelcheck", get(emulator::model_check_route))
        .route("/emulator/registrations/{reg}", get(emulator::dps_registration))
        .route("/emulator/faults", get(emulator::faults_get).put(emulator::faults_put).patch(emulator::faults_patch))
        .route("/emulator/faults/drop", post(emulator::faults_drop))
        .route("/emulator/faults/outage", post(emulator::faults_outage))
        .route("/emulator/telemetry/sequence", get(emulator::sequence_summary))
        .merge(extra)
        .layer(middleware::from_fn_with_state(hub.clone(), auth::scope))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(hub.clone(), count_requests))
        .with_state(hub)
}

async fn count_requests(State(hub): State<Hub>, req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    hub.metrics.rest_request(resp.status().as_u16());
    resp
}

fn limits(hub: &Hub) -> Limits {
    Limits {
        header_timeout: Duration::from_secs(hub.behaviour.http_header_timeout_secs),
        idle_timeout: Duration::from_secs(hub.behaviour.http_idle_timeout_secs),
    }
}

/// Serves HTTPS (HTTP/1.1 and HTTP/2, with upgrades for WebSockets) until shutdown, each
/// connection within the header and idle timeouts and the hub's connection bound.
pub async fn accept_loop(hub: Hub, listener: TcpListener, tls: Arc<rustls::ServerConfig>, extra: Router<Hub>) {
    let app = router(hub.clone(), extra);
    super::tls_accept_loop(hub, listener, tls, "https", move |hub, stream, slot| {
        // A client certificate reaches the handlers (MQTT over WebSockets) as an extension; the
        // layer is added only for the connections that presented one.
        let app = match crate::hub::x509::ClientChain::of(stream.get_ref().1) {
            Some(chain) => app.clone().layer(axum::Extension(chain)),
            None => app.clone(),
        };
        async move {
            crate::httpserve::serve_connection(stream, app, limits(&hub), Some(slot), hub.shutdown.clone()).await
        }
    })
    .await
}

/// Plain-HTTP `/metrics` (and `/healthz`) for Prometheus, and the caller's `extra` routes.
pub async fn metrics_loop(hub: Hub, listener: TcpListener, extra: Option<Router>) {
    let app = Router::new()
        .route(
            "/metrics",
            get(|State(hub): State<Hub>| async move { hub.metrics.render() + &crate::sys::process_metrics() }),
        )
        .route("/healthz", get(|| async { "ok" }))
        .with_state(hub.clone());
    let app = match extra {
        Some(e) => app.merge(e),
        None => app,
    };
    let bound = ConnectionBound::new(crate::httpserve::METRICS_CONNECTIONS);
    crate::httpserve::serve_plain(listener, app, limits(&hub), bound, "metrics", hub.shutdown.clone()).await
}
