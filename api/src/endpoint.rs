//! `host:port` network endpoints as the components exchange them: a node's
//! attestation endpoint announced at join and recorded in
//! `NodeAttestation.spec.attestationEndpoint`, the gate endpoints a node is
//! launched with.
//!
//! One parser, so the node that announces an endpoint, the gate that records
//! it and the re-attestation and `verify` that dial it read the same bytes
//! the same way. The host is an IPv4 address, a bracketed IPv6 address or a
//! lowercase DNS name; nothing else (no user info, no path, no whitespace, no
//! percent-encoding, no zone index) gets through, so a recorded value can
//! never be read as more than one address by a later reader. The rendered
//! form ([`Display`](std::fmt::Display)) is canonical: parsing it again
//! gives the same endpoint.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use thiserror::Error;

use crate::NodeAttestation;
use crate::keys::is_valid_node_name;

/// The host part of an [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Host {
    V4(Ipv4Addr),
    V6(Ipv6Addr),
    /// A DNS name (lowercase RFC 1123 subdomain, at most 253 characters).
    Name(String),
}

/// A `host:port` endpoint with a non-zero port.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub host: Host,
    pub port: u16,
}

/// Why a string is not an [`Endpoint`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum EndpointError {
    #[error("{0:?} is not host:port")]
    NoPort(String),
    #[error("{0:?}: the port must be a number from 1 to 65535")]
    Port(String),
    #[error(
        "{0:?}: the host must be an IPv4 address, an IPv6 address in brackets or a lowercase DNS name"
    )]
    Host(String),
}

impl FromStr for Endpoint {
    type Err = EndpointError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (host, port) = s
            .rsplit_once(':')
            .ok_or_else(|| EndpointError::NoPort(s.to_owned()))?;
        // `u16::from_str` accepts a leading `+`; a port is digits only.
        let port = match port.bytes().all(|b| b.is_ascii_digit()) && port.len() <= 5 {
            true => port.parse::<u16>().ok().filter(|p| *p != 0),
            false => None,
        }
        .ok_or_else(|| EndpointError::Port(s.to_owned()))?;
        let host = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Host::V6(
                inner
                    .parse::<Ipv6Addr>()
                    .map_err(|_| EndpointError::Host(s.to_owned()))?,
            )
        } else if host.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            // All digits and dots: an IPv4 address or nothing (never a
            // name, which resolvers would read as a number).
            Host::V4(
                host.parse::<Ipv4Addr>()
                    .map_err(|_| EndpointError::Host(s.to_owned()))?,
            )
        } else if is_valid_node_name(host) && !host.split('.').all(is_numeric_label) {
            Host::Name(host.to_owned())
        } else {
            return Err(EndpointError::Host(s.to_owned()));
        };
        Ok(Endpoint { host, port })
    }
}

/// A label `inet_aton` reads as a number (`127`, `0177`, `0x7f`): a name made
/// only of such labels is an IPv4 address to the C resolver, in a spelling
/// other readers do not share, so it is refused rather than read two ways.
fn is_numeric_label(label: &str) -> bool {
    let digits = label
        .strip_prefix("0x")
        .filter(|hex| !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()));
    digits.is_some() || label.bytes().all(|b| b.is_ascii_digit())
}

impl Endpoint {
    /// `ip:port` (an IPv6 address in brackets).
    pub fn from_ip(ip: IpAddr, port: u16) -> Self {
        let host = match ip {
            IpAddr::V4(v4) => Host::V4(v4),
            IpAddr::V6(v6) => Host::V6(v6),
        };
        Endpoint { host, port }
    }

    /// The endpoint recorded in `attestation` (`spec.attestationEndpoint`,
    /// written by the gate in canonical form), parsed as every reader must
    /// read it: `None` when none is recorded, an error for a value someone
    /// else wrote, which is never dialled.
    pub fn recorded(attestation: &NodeAttestation) -> Option<Result<Self, EndpointError>> {
        attestation
            .spec
            .attestation_endpoint
            .as_deref()
            .filter(|e| !e.is_empty())
            .map(str::parse)
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.host {
            Host::V4(ip) => write!(f, "{ip}:{}", self.port),
            Host::V6(ip) => write!(f, "[{ip}]:{}", self.port),
            Host::Name(name) => write!(f, "{name}:{}", self.port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names_parse_and_render_canonically() {
        for (given, rendered) in [
            ("127.0.0.1:9444", "127.0.0.1:9444"),
            ("[::1]:9444", "[::1]:9444"),
            ("[2001:db8:0:0::1]:1", "[2001:db8::1]:1"),
            ("node-a.example:65535", "node-a.example:65535"),
            ("localhost:9443", "localhost:9443"),
            ("10-0-2-15:9444", "10-0-2-15:9444"),
            ("0xnode.example:1", "0xnode.example:1"),
        ] {
            let endpoint: Endpoint = given.parse().expect(given);
            assert_eq!(endpoint.to_string(), rendered);
            assert_eq!(rendered.parse::<Endpoint>(), Ok(endpoint), "{given}");
        }
    }

    #[test]
    fn addresses_render_as_endpoints_and_only_a_recorded_value_is_read() {
        let v6: IpAddr = "fd00::7".parse().expect("ip");
        assert_eq!(Endpoint::from_ip(v6, 9444).to_string(), "[fd00::7]:9444");
        let v4: IpAddr = "10.0.0.7".parse().expect("ip");
        assert_eq!(Endpoint::from_ip(v4, 9444).to_string(), "10.0.0.7:9444");
        let mut att: NodeAttestation = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "n" },
            "spec": {
                "nodeName": "n", "evidenceKind": "Tpm", "image": "i",
                "akFingerprint": "ab", "attestedAt": "2026-01-01T00:00:00Z",
                "expiresAt": "2026-01-02T00:00:00Z", "verdict": "Trusted"
            }
        }))
        .expect("attestation");
        assert_eq!(Endpoint::recorded(&att), None);
        att.spec.attestation_endpoint = Some(String::new());
        assert_eq!(Endpoint::recorded(&att), None, "empty is none recorded");
        att.spec.attestation_endpoint = Some("user@host:1".into());
        assert!(matches!(Endpoint::recorded(&att), Some(Err(_))));
        att.spec.attestation_endpoint = Some("127.0.0.1:40001".into());
        assert_eq!(
            Endpoint::recorded(&att).map(|e| e.map(|e| e.to_string())),
            Some(Ok("127.0.0.1:40001".to_owned()))
        );
    }

    #[test]
    fn anything_else_is_refused_one_by_one() {
        for (bad, why) in [
            ("", "not host:port"),
            ("127.0.0.1", "not host:port"),
            ("127.0.0.1:0", "port"),
            ("127.0.0.1:65536", "port"),
            ("127.0.0.1:+80", "port"),
            ("127.0.0.1: 80", "port"),
            ("127.0.0.1:080080", "port"),
            (":9444", "host"),
            ("::1:9444", "host"),
            ("[::1%eth0]:9444", "host"),
            ("[fe80::1]x:9444", "host"),
            ("1.2.3:9444", "host"),
            ("0x7f.1:9444", "host"),
            ("0x7f000001:9444", "host"),
            ("0x7f.0.0.0x1:9444", "host"),
            ("999.1.1.1:9444", "host"),
            ("Node-A:9444", "host"),
            ("user@host:9444", "host"),
            ("host/path:9444", "host"),
            ("host :9444", "host"),
            ("host%2f:9444", "host"),
            ("-host:9444", "host"),
            ("host..example:9444", "host"),
        ] {
            let err = bad.parse::<Endpoint>().expect_err(bad).to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let long = format!("{}:1", "a.".repeat(127));
        assert!(
            long.parse::<Endpoint>().is_err(),
            "a name over 253 characters"
        );
    }
}
