//! The OpenAPI document: served without authentication, OpenAPI 3.x, and exactly the routes of
//! `smsgw::api::ROUTES` (the table the router is built from), each of which the daemon serves,
//! with the authentication the document says.

mod common;

use std::collections::BTreeSet;

use common::{Gateway, Sim, config_text, parse_config, sim_config, temp_db};
use serde_json::Value;
use smsgw::api::ROUTES;

const METHODS: [&str; 8] = [
    "get", "put", "post", "delete", "options", "head", "patch", "trace",
];

/// (METHOD, path) of every operation in the document.
fn documented(doc: &Value) -> BTreeSet<(String, String)> {
    let paths = doc["paths"].as_object().expect("the document has paths");
    paths
        .iter()
        .flat_map(|(path, item)| {
            METHODS
                .iter()
                .filter(|m| item.get(**m).is_some())
                .map(move |m| (m.to_uppercase(), path.clone()))
        })
        .collect()
}

/// The path with sample values for its parameters.
fn sample(path: &str) -> String {
    path.replace("{id}", "0190c1a4-5b6e-7c8d-9e0f-123456789abc")
        .replace("{number}", "%2B46701234567")
}

#[tokio::test]
async fn the_openapi_document_lists_exactly_the_routes_the_gateway_serves() {
    let sim = Sim::start(sim_config()).await;
    let (_dir, db) = temp_db();
    let gateway = Gateway::start(parse_config(&config_text(&db, sim.address(), None))).await;

    // Served without an API key.
    let r = gateway
        .client
        .get(format!("{}/v1/openapi.json", gateway.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "application/json");
    let doc: Value = r.json().await.unwrap();
    let version = doc["openapi"].as_str().expect("an openapi version");
    assert!(version.starts_with("3."), "OpenAPI 3.x, not {version}");
    assert_eq!(doc["info"]["title"], "smsgw");

    // The document and the router's table hold the same (method, path) pairs.
    let routed: BTreeSet<(String, String)> = ROUTES
        .iter()
        .map(|r| (r.method.to_owned(), r.path.to_owned()))
        .collect();
    assert_eq!(
        routed.len(),
        ROUTES.len(),
        "a route is listed twice in ROUTES"
    );
    let documented = documented(&doc);
    let undocumented: Vec<_> = routed.difference(&documented).collect();
    let unrouted: Vec<_> = documented.difference(&routed).collect();
    assert!(
        undocumented.is_empty() && unrouted.is_empty(),
        "routes without a #[utoipa::path] in ApiDoc: {undocumented:?}; \
         documented operations that no route serves: {unrouted:?}"
    );

    let bearer = &doc["components"]["securitySchemes"]["bearer"];
    assert_eq!(bearer["type"], "http");
    assert_eq!(bearer["scheme"], "bearer");

    // Each operation is served, and asks for the API key exactly when the document says so,
    // with the scope the route table enforces.
    for route in ROUTES {
        let (method, path) = (route.method, route.path);
        let operation = &doc["paths"][path][method.to_lowercase()];
        let scopes: Option<Vec<Value>> = operation["security"].as_array().and_then(|s| {
            s.iter()
                .find_map(|r| r.get("bearer").and_then(Value::as_array).cloned())
        });
        let secured = scopes.is_some();
        let expected = route.scope.map(|s| vec![Value::from(s.as_str())]);
        assert_eq!(scopes, expected, "{method} {path}: documented scopes");
        let responses = operation["responses"].as_object().unwrap();
        assert!(
            responses.keys().any(|s| s.starts_with('2')),
            "{method} {path}: no 2xx response documented"
        );
        assert!(
            operation["operationId"].is_string(),
            "{method} {path}: no operationId"
        );
        if secured {
            for code in ["401", "403", "429"] {
                assert!(
                    responses.contains_key(code),
                    "{method} {path}: secured, but {code} is not documented"
                );
            }
        }

        let url = format!("{}{}", gateway.url, sample(path));
        let request = gateway
            .client
            .request(method.parse().unwrap(), &url)
            .send()
            .await
            .unwrap();
        let status = request.status().as_u16();
        let body: Value = request.json().await.unwrap_or(Value::Null);
        assert!(
            status != 405 && body["error"]["code"] != "no_such_route",
            "{method} {path} is documented but not served: {status} {body}"
        );
        if secured {
            assert_eq!(status, 401, "{method} {path} without a key: {body}");
        } else {
            assert_ne!(
                status, 401,
                "{method} {path} asks for a key it does not document"
            );
        }
    }

    // What the table does not hold still answers in the API's error shape.
    let (status, body) = gateway.get(common::KEY_A, "/v1/no-such-thing").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (404, &"no_such_route".into())
    );
    let (status, body) = gateway.delete(common::KEY_A, "/v1/opt-outs").await;
    assert_eq!(
        (status, &body["error"]["code"]),
        (405, &"method_not_allowed".into())
    );

    gateway.stop().await;
}
