//! `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use crate::metrics::AgentMetrics;

/// Serves the endpoints on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<AgentMetrics>,
    needs_api: bool,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(render_metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(Endpoints { metrics, needs_api });
    axum::serve(listener, app).await
}

/// Binds the metrics address, with a clear error when it is taken.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen for /metrics on {addr}: {e}"))
}

#[derive(Clone)]
struct Endpoints {
    metrics: Arc<AgentMetrics>,
    needs_api: bool,
}

async fn render_metrics(State(endpoints): State<Endpoints>) -> String {
    endpoints.metrics.render()
}

/// Ready when the kmsg reader runs and, for a publishing agent, the API server answers.
async fn ready(State(endpoints): State<Endpoints>) -> (StatusCode, &'static str) {
    if endpoints.metrics.kmsg_reader_up.get() != 1 {
        (StatusCode::SERVICE_UNAVAILABLE, "kmsg reader not running\n")
    } else if endpoints.needs_api && endpoints.metrics.api_up.get() != 1 {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "API server not reachable\n",
        )
    } else {
        (StatusCode::OK, "ok\n")
    }
}
