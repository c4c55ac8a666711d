//! What the ingress does to a client's request before it crosses to an instance, and to the
//! response on its way back (pure).
//!
//! - `/<service>/<rest>?<query>` names the service; the instance's service gets
//!   `/<rest>?<query>`.
//! - Hop-by-hop headers (RFC 9110 section 7.6.1: `Connection` and every header it lists,
//!   `Keep-Alive`, `Proxy-Connection`, `TE`, `Transfer-Encoding`, `Upgrade`), and
//!   `Proxy-Authorization` (meant for a proxy, not the service) are dropped; everything else
//!   is kept. `Trailer` (which announces trailers)
//!   is end-to-end and kept.
//! - `Via` gets this proxy appended (`2 multi-tier-cloud` on a request received over HTTP/2,
//!   `1.1 ...` otherwise) and `X-Forwarded-For` the client's address.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue, header};

/// The `Via` entry of this proxy (RFC 9110 section 7.6.3).
pub const VIA: &str = "1.1 multi-tier-cloud";
/// The `Via` entry of this proxy on a request it received over HTTP/2 (its received-protocol
/// is `2`); the sidecar reads it to know the client spoke HTTP/2 ([`crate::sidecar`]).
pub const VIA_H2: &str = "2 multi-tier-cloud";

/// Why a request target names no service it may be sent to; the client is answered 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// The target does not start with `/<service>`: it is `/`, `/?...`, `//...` or not a
    /// path (`*`).
    #[error("no service in the path: requests go to /<service>/<path>")]
    NoService,
    /// The first segment is not a name the lookup accepts; holds its first 64 characters.
    #[error("'{0}' is not a service name")]
    BadName(String),
}

/// Splits `/<service>[/<rest>][?<query>]` into the service name and what follows it (empty,
/// or starting with `/` or `?`), borrowed. A name the lookup would refuse is refused here.
pub fn split_service(path_and_query: &str) -> Result<(&str, &str), RouteError> {
    let rest = path_and_query
        .strip_prefix('/')
        .ok_or(RouteError::NoService)?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (service, after) = rest.split_at(end);
    if service.is_empty() {
        return Err(RouteError::NoService);
    }
    if mtc_overlay::lookup::record::validate_name(service).is_err() {
        return Err(RouteError::BadName(service.chars().take(64).collect()));
    }
    Ok((service, after))
}

/// Splits a request target into the service name and the target for the service.
pub fn split_target(path_and_query: &str) -> Result<(&str, String), RouteError> {
    let (service, after) = split_service(path_and_query)?;
    let target = if after.starts_with('/') {
        after.to_owned()
    } else {
        format!("/{after}")
    };
    Ok((service, target))
}

/// The fields that never cross a proxy, lower case: the hop-by-hop ones (RFC 9110 section
/// 7.6.1) and `Proxy-Authorization`, meant for a proxy. Both fronts drop these (and those the
/// `Connection` field names): here from a `HeaderMap`, in [`crate::http1::front`] from bytes.
pub const HOP_BY_HOP: [&str; 7] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

/// Removes the hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|list| list.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Prepares the headers of a request a client sent over HTTP/2 for the trip to an instance.
pub fn forward_request_headers(headers: &mut HeaderMap, client: IpAddr) {
    strip_hop_by_hop(headers);
    headers.append(header::VIA, HeaderValue::from_static(VIA_H2));
    let forwarded = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(previous) => format!("{previous}, {client}"),
        None => client.to_string(),
    };
    if let Ok(value) = HeaderValue::from_str(&forwarded) {
        headers.insert("x-forwarded-for", value);
    }
}

/// Prepares an instance's response headers for the trip back to the client.
pub fn forward_response_headers(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    append_via(headers);
}

fn append_via(headers: &mut HeaderMap) {
    headers.append(header::VIA, HeaderValue::from_static(VIA));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_segment_is_the_service() {
        assert_eq!(
            split_target("/hello-world-server").unwrap(),
            ("hello-world-server", "/".into())
        );
        assert_eq!(
            split_target("/hello-world-server/").unwrap(),
            ("hello-world-server", "/".into())
        );
        assert_eq!(
            split_target("/calc:1.1/add?num1=1&num2=2").unwrap(),
            ("calc:1.1", "/add?num1=1&num2=2".into())
        );
        // The seed broke on `/<name>?q` without a slash.
        assert_eq!(split_target("/svc?x=1").unwrap(), ("svc", "/?x=1".into()));
        assert_eq!(
            split_target("/svc/a/b/c").unwrap(),
            ("svc", "/a/b/c".into())
        );
        assert_eq!(split_target("/"), Err(RouteError::NoService));
        assert_eq!(split_target("/?x"), Err(RouteError::NoService));
        assert_eq!(split_target("*"), Err(RouteError::NoService));
        assert_eq!(
            split_target("/sp%20ace/x"),
            Err(RouteError::BadName("sp%20ace".into()))
        );
    }

    #[test]
    fn hop_by_hop_headers_go_and_the_rest_stay() {
        let mut headers = HeaderMap::new();
        for (name, value) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("x-secret-hop", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "h2c"),
            ("proxy-connection", "keep-alive"),
            ("trailer", "grpc-status"),
            ("content-type", "text/plain"),
            ("x-end-to-end", "yes"),
        ] {
            headers.append(name, HeaderValue::from_static(value));
        }
        forward_request_headers(&mut headers, "10.1.2.3".parse().unwrap());
        let mut names: Vec<_> = headers.keys().map(|n| n.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(
            names,
            [
                "content-type",
                "trailer",
                "via",
                "x-end-to-end",
                "x-forwarded-for"
            ]
        );
        assert_eq!(headers["x-forwarded-for"], "10.1.2.3");
        assert_eq!(headers["via"], VIA_H2);
    }

    #[test]
    fn forwarding_headers_accumulate() {
        let mut headers = HeaderMap::new();
        headers.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.1"));
        headers.insert("via", HeaderValue::from_static("1.1 edge-cache"));
        forward_request_headers(&mut headers, "::1".parse().unwrap());
        assert_eq!(headers["x-forwarded-for"], "192.0.2.1, ::1");
        let via: Vec<_> = headers.get_all("via").iter().collect();
        assert_eq!(via, ["1.1 edge-cache", VIA_H2]);
        let mut response = HeaderMap::new();
        response.insert("connection", HeaderValue::from_static("close"));
        forward_response_headers(&mut response);
        assert!(response.get("connection").is_none());
        assert_eq!(response["via"], VIA);
    }
}
