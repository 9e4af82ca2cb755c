//! The Prometheus endpoint both binaries serve: `GET /metrics` from a registry, in the
//! OpenMetrics text format, optionally behind the shared token.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::{Context, Result};
use prometheus_client::encoding::text::encode;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;

/// Renders `registry` in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

/// Serves `GET /metrics` from `registry` on `listener` until the task is dropped; with
/// a `token`, only to requests that carry it (`authorization: Bearer …`), others get 401.
pub async fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    token: Option<crate::auth::Token>,
) -> Result<()> {
    use axum::http::StatusCode;
    use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
    use axum::response::IntoResponse;
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move |headers: axum::http::HeaderMap| {
            let allowed = token.as_ref().is_none_or(|t| {
                headers
                    .get(AUTHORIZATION)
                    .is_some_and(|v| t.accepts_header(v.as_bytes()))
            });
            let response = if allowed {
                (
                    [(
                        CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    render(&registry),
                )
                    .into_response()
            } else {
                (
                    StatusCode::UNAUTHORIZED,
                    [(WWW_AUTHENTICATE, "Bearer")],
                    "missing or wrong token: /metrics needs the coordinator's token\n",
                )
                    .into_response()
            };
            async move { response }
        }),
    );
    axum::serve(listener, app)
        .await
        .context("the metrics endpoint failed")
}

/// Binds `addr` for the metrics endpoint.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen for metrics on {addr}; is the port in use?"))
}
