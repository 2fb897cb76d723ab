//! A machine's launch configuration: `KEY=value` lines (the
//! bootstrapper's environment variables, which the node image's init
//! passes on) in the fw_cfg file the VM gets. Pure: what the lines are,
//! and the refusal of a value that would smuggle in another line.

use confidential_api::keys::{LABEL_NODE_IMAGE, LABEL_NODE_POOL, image_label_value};
use confidential_controllers::provider::MachineRequest;
use confidential_testenv::vm::GuestForward;

/// The launch configuration keys a machine gets (the bootstrapper's
/// environment variables; the image's init passes them on).
pub const ENV_NODE_NAME: &str = "CONFIDENTIAL_NODE_NAME";
pub const ENV_POOL: &str = "CONFIDENTIAL_POOL";
pub const ENV_GATE_ENDPOINTS: &str = "CONFIDENTIAL_GATE_ENDPOINTS";
pub const ENV_GATE_PIN: &str = "CONFIDENTIAL_GATE_PIN";
pub const ENV_DISK_UUID: &str = "CONFIDENTIAL_DISK_UUID";
/// The labels the node's kubelet registers with (`--node-labels`): the
/// pool and image identity labels, which the gate's admission checks
/// against the machine's attestation (a wrong value is refused).
pub const ENV_NODE_LABELS: &str = "CONFIDENTIAL_NODE_LABELS";

/// Cluster-wide part of every machine's launch configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchConfig {
    /// The gate's join endpoints (`host:port`) as the guest reaches them.
    pub gate_endpoints: Vec<String>,
    /// The gate key every machine pins.
    pub gate_pin: [u8; 32],
    /// The host's loopback ports the guest may reach (the gate's join
    /// port, the API server): nothing else.
    pub forwards: Vec<GuestForward>,
}

/// A launch configuration value that would break the `KEY=value` format.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("launch configuration {key}: {value:?} holds a line break or NUL")]
pub struct LaunchValueError {
    key: &'static str,
    value: String,
}

impl LaunchConfig {
    /// The `KEY=value` lines of one machine's launch configuration. A value
    /// that could smuggle another line is refused.
    pub fn node_env(
        &self,
        request: &MachineRequest,
        disk_uuid: &str,
    ) -> Result<String, LaunchValueError> {
        let mut text = String::new();
        for (key, value) in [
            (ENV_NODE_NAME, request.name.clone()),
            (ENV_POOL, request.pool.clone()),
            (ENV_GATE_ENDPOINTS, self.gate_endpoints.join(",")),
            (ENV_GATE_PIN, hex::encode(self.gate_pin)),
            (ENV_DISK_UUID, disk_uuid.to_owned()),
            (
                ENV_NODE_LABELS,
                format!(
                    "{LABEL_NODE_POOL}={},{LABEL_NODE_IMAGE}={}",
                    request.pool,
                    image_label_value(&request.image)
                ),
            ),
        ] {
            if value.contains(['\n', '\r', '\0']) {
                return Err(LaunchValueError { key, value });
            }
            text.push_str(&format!("{key}={value}\n"));
        }
        Ok(text)
    }
}

/// An RFC 4122 version-4 UUID from 16 random bytes.
pub(super) fn uuid_v4(mut bytes: [u8; 16]) -> String {
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let h = hex::encode(bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_machine_gets_its_own_launch_configuration() {
        let launch = LaunchConfig {
            gate_endpoints: vec!["10.0.2.100:9443".into(), "10.0.2.100:9444".into()],
            gate_pin: [0xab; 32],
            forwards: Vec::new(),
        };
        let mut request = MachineRequest {
            name: "default-abc12".into(),
            pool: "default".into(),
            image: "registry.example/confidential-node:v1".into(),
            kubernetes_version: "v1.35.4".into(),
            control_plane: false,
        };
        let env = launch
            .node_env(&request, "00000000-0000-4000-8000-000000000001")
            .expect("valid values");
        assert_eq!(
            env,
            format!(
                "CONFIDENTIAL_NODE_NAME=default-abc12\n\
                 CONFIDENTIAL_POOL=default\n\
                 CONFIDENTIAL_GATE_ENDPOINTS=10.0.2.100:9443,10.0.2.100:9444\n\
                 CONFIDENTIAL_GATE_PIN={}\n\
                 CONFIDENTIAL_DISK_UUID=00000000-0000-4000-8000-000000000001\n\
                 CONFIDENTIAL_NODE_LABELS=confidential.dev/node-pool=default,\
                 confidential.dev/node-image=registry.example_confidential-node_v1\n",
                "ab".repeat(32)
            )
        );
        for smuggled in ["a\nCONFIDENTIAL_GATE_PIN=00", "a\rb", "a\0b"] {
            request.pool = smuggled.into();
            let err = launch
                .node_env(&request, "00000000-0000-4000-8000-000000000001")
                .expect_err(smuggled);
            assert!(err.to_string().contains("CONFIDENTIAL_POOL"), "{err}");
        }
    }

    #[test]
    fn disk_uuids_are_version_4() {
        let uuid = uuid_v4([0xff; 16]);
        assert_eq!(uuid, "ffffffff-ffff-4fff-bfff-ffffffffffff");
        assert!(confidential_attestation::kdf::is_valid_disk_uuid(&uuid_v4(
            [0; 16]
        )));
    }
}
