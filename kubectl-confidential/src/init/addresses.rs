//! Where the gate is reached: the names its serving certificate covers
//! (the Service's DNS names, or the host of `--gate-url`) and the address
//! machines use for the join endpoint under each `--join-exposure`, read
//! back from the cluster after the install. Pure functions.

use anyhow::{Context, Result, bail};
use k8s_openapi::api::core::v1::{Node, Service};

use super::args::JoinExposure;
use super::objects::{self, GatePlacement};

/// Port of the join endpoint in the gate's Pod and its Services.
const JOIN_PORT: u16 = 9443;

/// The names the gate's serving certificate must cover.
pub fn serving_names(placement: &GatePlacement, namespace: &str) -> Result<Vec<String>> {
    Ok(match placement {
        GatePlacement::InCluster => vec![
            format!("{}.{namespace}.svc", objects::GATE),
            format!("{}.{namespace}.svc.cluster.local", objects::GATE),
        ],
        GatePlacement::External(url) => vec![https_url(url, "--gate-url")?.0],
    })
}

/// The host (an IPv6 address without brackets) and port of an `https`
/// URL named by `flag`; anything else is refused.
fn https_url(url: &str, flag: &str) -> Result<(String, Option<u16>)> {
    let uri: http::Uri = url
        .parse()
        .with_context(|| format!("{flag} {url:?} is not a URL"))?;
    if uri.scheme_str() != Some("https") {
        bail!("{flag} {url}: https only (the API server serves and calls webhooks over TLS)");
    }
    let host = uri
        .host()
        .with_context(|| format!("{flag} {url} names no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    Ok((host, uri.port_u16()))
}

/// Where host-network pods reach the API server (`--host-network`): the
/// host and port of `url`, which must be an `https` address the nodes
/// reach. A loopback address is refused: it names each node itself.
pub fn host_network_api_server(url: &str) -> Result<(String, u16)> {
    let (host, port) = https_url(url, "--node-api-server")?;
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified());
    if loopback {
        bail!(
            "{url} is this machine's loopback; on a node it names the node itself. \
             Pass --node-api-server with the address the nodes reach the API server at"
        );
    }
    Ok((host, port.unwrap_or(443)))
}

/// Where machines reach the join endpoint (pure), for the cluster file.
pub fn gate_endpoint(
    exposure: &JoinExposure,
    nodes: &[Node],
    join_service: Option<&Service>,
    server: &str,
) -> Option<String> {
    let address = |node: &Node| {
        node.status
            .as_ref()?
            .addresses
            .as_ref()?
            .iter()
            .find(|a| a.type_ == "InternalIP")
            .map(|a| a.address.clone())
    };
    let is_control_plane = |node: &Node| {
        node.metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key("node-role.kubernetes.io/control-plane"))
    };
    let control_plane = nodes
        .iter()
        .filter(|n| is_control_plane(n))
        .find_map(address);
    match exposure {
        JoinExposure::External(address) => Some(address.clone()),
        JoinExposure::HostNetwork => control_plane.map(|a| format!("{a}:{JOIN_PORT}")),
        JoinExposure::NodePort => {
            let port = join_service?
                .spec
                .as_ref()?
                .ports
                .as_ref()?
                .iter()
                .find_map(|p| p.node_port)?;
            let host = control_plane
                .or_else(|| nodes.iter().find_map(address))
                .or_else(|| {
                    server
                        .parse::<http::Uri>()
                        .ok()
                        .and_then(|u| u.host().map(str::to_owned))
                })?;
            Some(format!("{host}:{port}"))
        }
        JoinExposure::LoadBalancer => {
            let ingress = join_service?
                .status
                .as_ref()?
                .load_balancer
                .as_ref()?
                .ingress
                .as_ref()?
                .first()?
                .clone();
            let host = ingress.ip.or(ingress.hostname)?;
            Some(format!("{host}:{JOIN_PORT}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn host_network_pods_reach_the_api_server_where_nodes_do() {
        assert_eq!(
            host_network_api_server("https://10.213.0.1:6443").expect("ok"),
            ("10.213.0.1".to_owned(), 6443)
        );
        assert_eq!(
            host_network_api_server("https://api.example.com").expect("ok"),
            ("api.example.com".to_owned(), 443)
        );
        assert_eq!(
            host_network_api_server("https://[fd00::1]:6443").expect("ok"),
            ("fd00::1".to_owned(), 6443)
        );
        for bad in [
            "https://127.0.0.1:6443",
            "https://localhost:6443",
            "https://[::1]:6443",
            "https://0.0.0.0:6443",
            "http://10.213.0.1:6443",
            "10.213.0.1:6443",
            "not a url",
        ] {
            let err = host_network_api_server(bad).expect_err(bad);
            let text = format!("{err:#}");
            assert!(
                text.contains("--node-api-server")
                    || text.contains("https")
                    || text.contains("URL"),
                "{bad}: {text}"
            );
        }
    }

    #[test]
    fn the_join_endpoint_follows_the_exposure() {
        let node = |name: &str, ip: &str, cp: bool| -> Node {
            let labels = if cp {
                json!({"node-role.kubernetes.io/control-plane": ""})
            } else {
                json!({})
            };
            serde_json::from_value(json!({
                "metadata": {"name": name, "labels": labels},
                "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
            }))
            .expect("node")
        };
        let nodes = [node("w", "10.0.0.9", false), node("cp", "10.0.0.1", true)];
        let service: Service = serde_json::from_value(json!({
            "spec": {"ports": [{"port": 9443, "nodePort": 30443}]},
            "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.5"}]}},
        }))
        .expect("svc");
        let server = "https://198.51.100.1:6443";
        assert_eq!(
            gate_endpoint(&JoinExposure::NodePort, &nodes, Some(&service), server).as_deref(),
            Some("10.0.0.1:30443")
        );
        assert_eq!(
            gate_endpoint(&JoinExposure::NodePort, &[], Some(&service), server).as_deref(),
            Some("198.51.100.1:30443")
        );
        assert_eq!(
            gate_endpoint(&JoinExposure::LoadBalancer, &nodes, Some(&service), server).as_deref(),
            Some("203.0.113.5:9443")
        );
        assert_eq!(
            gate_endpoint(&JoinExposure::HostNetwork, &nodes, None, server).as_deref(),
            Some("10.0.0.1:9443")
        );
        assert_eq!(
            gate_endpoint(
                &JoinExposure::External("gate.example:443".into()),
                &[],
                None,
                server
            )
            .as_deref(),
            Some("gate.example:443")
        );
    }

    #[test]
    fn serving_names_cover_the_service_or_the_gate_url() {
        assert_eq!(
            serving_names(&GatePlacement::InCluster, objects::NAMESPACE).expect("names")[0],
            "confidential-webhook.confidential-system.svc"
        );
        assert_eq!(
            serving_names(
                &GatePlacement::External("https://127.0.0.1:8443".into()),
                objects::NAMESPACE
            )
            .expect("names"),
            vec!["127.0.0.1".to_owned()]
        );
        assert!(
            serving_names(
                &GatePlacement::External("http://127.0.0.1:8443".into()),
                objects::NAMESPACE
            )
            .is_err()
        );
    }
}
