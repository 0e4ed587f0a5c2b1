//! The checked-in OpenAPI document must match what the daemon serves.
//! Regenerate with `UPDATE_OPENAPI=1 cargo test -p cove-server --test openapi`
//! (or `cove openapi > docs/openapi.json`).

#![allow(clippy::unwrap_used)]

#[test]
fn checked_in_openapi_is_current() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs/openapi.json");
    let generated = cove_server::api::openapi_json();
    if std::env::var_os("UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "docs/openapi.json is stale: run `UPDATE_OPENAPI=1 cargo test -p cove-server --test openapi` and commit it"
    );
}

#[test]
fn every_route_is_documented_with_its_errors() {
    let doc: serde_json::Value = serde_json::from_str(&cove_server::api::openapi_json()).unwrap();
    for path in [
        "/v1/sandboxes",
        "/v1/sandboxes/{id}",
        "/v1/sandboxes/{id}/exec",
        "/v1/sandboxes/{id}/pause",
        "/v1/sandboxes/{id}/resume",
        "/v1/sandboxes/{id}/timeout",
        "/v1/sandboxes/{id}/wait",
        "/v1/keys",
        "/v1/keys/{id}",
        "/v1/templates",
        "/healthz",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is not documented");
    }
    let exec = &doc["paths"]["/v1/sandboxes/{id}/exec"]["post"]["responses"];
    for status in ["200", "400", "409", "410", "502"] {
        assert!(exec[status].is_object(), "exec does not document {status}");
    }
    assert!(doc["components"]["schemas"]["ErrorBody"].is_object());
}
