//! What the operators' listeners (the admin API, metrics) accept. They are for an operator's
//! command line and for Prometheus, never for a browser: a web page open on the same machine
//! can send requests to loopback (a form or `fetch` with `Content-Type: text/plain` needs no
//! CORS preflight), and a DNS-rebinding page can read the answers. So a request with an
//! `Origin` (or a `Sec-Fetch-Site` other than `none`) is refused, and so is a `Host` that is not
//! the listener's own: `localhost` or an address literal with the listener's port (a rebinding
//! page sends its own domain name), or, on a Unix socket, `localhost` or none. When a token
//! is configured, every request must also carry it.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ApiError;
use crate::config::Secret;

/// The checks of one listener.
#[derive(Clone)]
pub struct Guard(Arc<Rules>);

struct Rules {
    /// The port `Host` must name; None on a Unix socket.
    port: Option<u16>,
    /// SHA-256 of the token (compared as hashes: equal lengths, in constant time).
    token: Option<[u8; 32]>,
    /// The key the token comes from, for the 401's message.
    token_key: &'static str,
}

impl Guard {
    /// A TCP listener on `port`.
    pub fn tcp(port: u16, token: Option<&Secret>, token_key: &'static str) -> Guard {
        Guard::new(Some(port), token, token_key)
    }

    /// A Unix socket.
    pub fn socket(token: Option<&Secret>, token_key: &'static str) -> Guard {
        Guard::new(None, token, token_key)
    }

    fn new(port: Option<u16>, token: Option<&Secret>, token_key: &'static str) -> Guard {
        Guard(Arc::new(Rules {
            port,
            token: token.map(|t| Sha256::digest(t.expose().as_bytes()).into()),
            token_key,
        }))
    }

    /// `router` behind these checks.
    pub fn protect(&self, router: axum::Router) -> axum::Router {
        router.layer(middleware::from_fn_with_state(self.clone(), check))
    }

    /// Whether a request with these headers may be served.
    pub fn admit(&self, method: &Method, headers: &HeaderMap) -> Result<(), ApiError> {
        let browser = headers.contains_key(header::ORIGIN)
            || headers
                .get_all("sec-fetch-site")
                .iter()
                .any(|site| site.as_bytes() != b"none");
        if browser {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "browser_request_refused",
                "this listener is for operators' tools, not browsers: a request with an Origin \
                 (or Sec-Fetch-Site) header is refused",
            ));
        }
        let mut hosts = headers.get_all(header::HOST).iter();
        let host = hosts.next();
        if hosts.next().is_some() || host.is_some_and(|host| !self.own_host(host.as_bytes())) {
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "host_refused",
                "the Host header must be localhost or an address, with this listener's port",
            ));
        }
        if let Some(token) = &self.0.token {
            let presented = headers
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.strip_prefix("Bearer "))
                .map(|presented| Sha256::digest(presented.trim().as_bytes()));
            if !presented.is_some_and(|presented| bool::from(presented.ct_eq(token))) {
                return Err(ApiError::new(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    format!(
                        "missing or wrong token; send `Authorization: Bearer <{}>`",
                        self.0.token_key
                    ),
                ));
            }
        }
        // Nothing here takes a form or text: a body, when one comes, is JSON.
        let bodiless = [Method::GET, Method::HEAD].contains(method);
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .is_none_or(|value| {
                value
                    .split(';')
                    .next()
                    .is_some_and(|kind| kind.trim().eq_ignore_ascii_case("application/json"))
            });
        if !bodiless && !json {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "a request body must be application/json",
            ));
        }
        Ok(())
    }

    /// `localhost` or an IP address literal, with the listener's port (80 when absent); on a
    /// Unix socket, `localhost` with any port.
    fn own_host(&self, host: &[u8]) -> bool {
        let Ok(host) = std::str::from_utf8(host) else {
            return false;
        };
        let (name, port) = split_host(host);
        let Some(port) = port.map(|p| p.parse::<u16>().ok()).unwrap_or(Some(80)) else {
            return false;
        };
        let localhost = name.eq_ignore_ascii_case("localhost");
        match self.0.port {
            None => localhost,
            Some(own) => {
                let literal = name
                    .strip_prefix('[')
                    .and_then(|n| n.strip_suffix(']'))
                    .map_or_else(
                        || name.parse::<std::net::Ipv4Addr>().is_ok(),
                        |v6| v6.parse::<std::net::Ipv6Addr>().is_ok(),
                    );
                (localhost || literal) && port == own
            }
        }
    }
}

/// `name[:port]`, where name may be a bracketed IPv6 literal.
fn split_host(host: &str) -> (&str, Option<&str>) {
    if host.starts_with('[') {
        return match host.find(']') {
            Some(end) => {
                let (name, rest) = host.split_at(end + 1);
                (name, rest.strip_prefix(':'))
            }
            None => (host, None),
        };
    }
    match host.rsplit_once(':') {
        Some((name, port)) => (name, Some(port)),
        None => (host, None),
    }
}

async fn check(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    match guard.admit(request.method(), request.headers()) {
        Ok(()) => next.run(request).await,
        Err(refused) => {
            tracing::warn!(
                code = refused.code,
                method = %request.method(),
                path = request.uri().path(),
                "operators' listener refused a request"
            );
            refused.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                value.parse().unwrap(),
            );
        }
        map
    }

    fn code(guard: &Guard, method: Method, pairs: &[(&str, &str)]) -> Option<&'static str> {
        guard.admit(&method, &headers(pairs)).err().map(|e| e.code)
    }

    #[test]
    fn a_tcp_listener_takes_its_own_host_only() {
        let guard = Guard::tcp(8081, None, "admin.token");
        for host in [
            "localhost:8081",
            "LOCALHOST:8081",
            "127.0.0.1:8081",
            "[::1]:8081",
            "10.1.2.3:8081",
        ] {
            assert_eq!(code(&guard, Method::GET, &[("host", host)]), None, "{host}");
        }
        assert_eq!(code(&guard, Method::GET, &[]), None, "no Host (HTTP/1.0)");
        for host in [
            "evil.example:8081",
            "localhost.evil.example:8081",
            "127.0.0.1:8080",
            "127.0.0.1",
            "localhost:x",
            "[::1:8081",
            "::1:8081",
        ] {
            assert_eq!(
                code(&guard, Method::GET, &[("host", host)]),
                Some("host_refused"),
                "{host}"
            );
        }
        let twice = [("host", "localhost:8081"), ("host", "evil.example:8081")];
        assert_eq!(code(&guard, Method::GET, &twice), Some("host_refused"));
        let port_80 = Guard::tcp(80, None, "admin.token");
        assert_eq!(code(&port_80, Method::GET, &[("host", "localhost")]), None);
    }

    #[test]
    fn a_socket_takes_localhost_or_no_host() {
        let guard = Guard::socket(None, "admin.token");
        assert_eq!(code(&guard, Method::GET, &[("host", "localhost")]), None);
        assert_eq!(code(&guard, Method::GET, &[]), None);
        assert_eq!(
            code(&guard, Method::GET, &[("host", "127.0.0.1:8081")]),
            Some("host_refused")
        );
    }

    #[test]
    fn browsers_are_refused_whatever_else_is_right() {
        let token = Secret("an-admin-token-0123456789".into());
        let guard = Guard::tcp(8081, Some(&token), "admin.token");
        let good = ("authorization", "Bearer an-admin-token-0123456789");
        let host = ("host", "127.0.0.1:8081");
        assert_eq!(code(&guard, Method::POST, &[host, good]), None);
        for browser in [
            ("origin", "http://evil.example"),
            ("origin", "null"),
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-site", "same-origin"),
        ] {
            assert_eq!(
                code(&guard, Method::POST, &[host, good, browser]),
                Some("browser_request_refused"),
                "{browser:?}"
            );
        }
        assert_eq!(
            code(
                &guard,
                Method::GET,
                &[host, good, ("sec-fetch-site", "none")]
            ),
            None
        );
        assert_eq!(
            code(
                &guard,
                Method::POST,
                &[host, good, ("content-type", "text/plain")]
            ),
            Some("unsupported_media_type")
        );
        assert_eq!(
            code(
                &guard,
                Method::POST,
                &[
                    host,
                    good,
                    ("content-type", "application/json; charset=utf-8")
                ]
            ),
            None
        );
    }

    #[test]
    fn the_token_must_match() {
        let token = Secret("an-admin-token-0123456789".into());
        let guard = Guard::tcp(8081, Some(&token), "admin.token");
        let host = ("host", "localhost:8081");
        for wrong in [
            vec![host],
            vec![host, ("authorization", "Bearer an-admin-token-012345678")],
            vec![host, ("authorization", "Basic an-admin-token-0123456789")],
            vec![host, ("authorization", "an-admin-token-0123456789")],
        ] {
            assert_eq!(
                code(&guard, Method::GET, &wrong),
                Some("unauthorized"),
                "{wrong:?}"
            );
        }
    }
}
