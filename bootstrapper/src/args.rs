//! The command line, and its validation into a [`Config`] whose types leave
//! no invalid combination to check later.
//!
//! Kept apart from the steps so that every refusal of a bad flag happens here,
//! before the node touches its TPM, its disk or the network: a bad launch
//! configuration changes nothing. Every flag can also come from the
//! environment (`CONFIDENTIAL_*`), the form a VM launch configuration passes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

use clap::{Parser, ValueEnum};
use confidential_api::endpoint::{Endpoint, EndpointError};
use thiserror::Error;

/// Boot agent of a confidential node: attest to the cluster's gate over
/// aTLS, unlock the state disk, extend a PCR with the cluster ID, start the
/// kubelet (kubeadm join), then optionally serve `/v1/attest`.
#[derive(Parser, Debug)]
#[command(version, about)]
pub struct Args {
    /// Join endpoints of the gate (`host:port`), tried in order.
    #[arg(
        long = "endpoint",
        env = "CONFIDENTIAL_GATE_ENDPOINTS",
        value_delimiter = ',',
        required = true
    )]
    pub endpoints: Vec<String>,
    /// The gate's key pin: hex SHA-256 of its SubjectPublicKeyInfo, the key
    /// every gate replica derives from the cluster's master secret
    /// (`GateIdentity::pin`). Required: the node refuses any other server
    /// before sending it anything.
    #[arg(long, env = "CONFIDENTIAL_GATE_PIN")]
    pub gate_pin: GatePin,
    /// Name the node joins under.
    #[arg(long, env = "CONFIDENTIAL_NODE_NAME")]
    pub node_name: String,
    /// Evidence this machine presents: a TPM 2.0 quote (`tpm`, vTPM or
    /// swtpm) or an AMD SEV-SNP report (`snp`, needs `/dev/sev-guest`).
    #[arg(long, value_enum, default_value_t = EvidenceKind::Tpm, env = "CONFIDENTIAL_EVIDENCE")]
    pub evidence: EvidenceKind,
    /// With `--evidence snp`: DER VCEK certificate to send when the host's
    /// certificate table has none (fetched from AMD's KDS beforehand).
    #[arg(long, env = "CONFIDENTIAL_SNP_VCEK")]
    pub snp_vcek: Option<PathBuf>,
    /// TPM to use (TCTI): `device:/dev/tpmrm0`, `swtpm:host=127.0.0.1,port=2321`.
    /// With `--evidence snp` the TPM is not used.
    #[arg(long, default_value = "device:/dev/tpmrm0", env = "CONFIDENTIAL_TCTI")]
    pub tcti: String,
    /// PCRs (SHA-256 bank) to quote; must cover every PCR the policy expects.
    #[arg(long, value_delimiter = ',', default_values_t = [0u32, 1, 2, 3, 4, 5, 6, 7, 8, 9], env = "CONFIDENTIAL_PCRS")]
    pub pcrs: Vec<u32>,
    /// NodeVersion (pool) this node boots for; the gate's default when absent.
    #[arg(long, env = "CONFIDENTIAL_POOL")]
    pub pool: Option<String>,
    /// UUID of the state disk (its key is derived from it).
    #[arg(long, env = "CONFIDENTIAL_DISK_UUID")]
    pub disk_uuid: String,
    /// Block device of the state disk: formatted (only when `cryptsetup
    /// isLuks` says it is not LUKS) and opened as `/dev/mapper/state`.
    #[arg(
        long,
        env = "CONFIDENTIAL_STATE_DEVICE",
        conflicts_with = "disk_key_file"
    )]
    pub state_device: Option<PathBuf>,
    /// With --state-device: mount the opened volume here (ext4, created
    /// only right after this node formatted the LUKS volume, never on an
    /// existing one), e.g. `/var/lib` for containerd and the kubelet.
    #[arg(long, env = "CONFIDENTIAL_STATE_MOUNT", requires = "state_device")]
    pub state_mount: Option<PathBuf>,
    /// Without a device, write the state disk key here (mode 0600).
    #[arg(long, env = "CONFIDENTIAL_DISK_KEY_FILE")]
    pub disk_key_file: Option<PathBuf>,
    /// PCR extended with the cluster ID after joining (TPM evidence only).
    #[arg(long, default_value_t = 15, env = "CONFIDENTIAL_CLUSTER_ID_PCR")]
    pub cluster_id_pcr: u32,
    /// Ask `/v1/rejoin` (a rebooting node that is still attested).
    #[arg(long)]
    pub rejoin: bool,
    /// Instead of `kubeadm join`, write a kubelet bootstrap kubeconfig here
    /// (mode 0600; the kubelet is started by someone else, e.g. the test
    /// environment).
    #[arg(long, env = "CONFIDENTIAL_KUBELET_BOOTSTRAP_KUBECONFIG")]
    pub kubelet_bootstrap_kubeconfig: Option<PathBuf>,
    /// Join attempts over all endpoints before giving up (0: forever).
    #[arg(long, default_value_t = 0, env = "CONFIDENTIAL_MAX_ATTEMPTS")]
    pub max_attempts: u32,
    /// File keeping the AK (TPM-wrapped, useless elsewhere; mode 0600)
    /// across reboots, so the machine keeps its identity for rejoin.
    #[arg(
        long,
        default_value = "/var/lib/confidential/ak.blob",
        env = "CONFIDENTIAL_AK_STATE"
    )]
    pub ak_state: PathBuf,
    /// After joining, serve `/v1/attest` over aTLS on this address.
    #[arg(long, env = "CONFIDENTIAL_ATTEST_LISTEN")]
    pub attest_listen: Option<SocketAddr>,
    /// With --attest-listen: the `host:port` the cluster reaches that
    /// endpoint at when it is not the Node's InternalIP (e.g. a host port
    /// forwarded into a VM). Announced at join and recorded in the
    /// NodeAttestation, where the gate's re-attestation and `kubectl
    /// confidential verify` dial it. Only a hint: whoever answers there must
    /// quote with this node's attested key.
    #[arg(long, env = "CONFIDENTIAL_ATTEST_ENDPOINT", requires = "attest_listen")]
    pub attest_advertise: Option<Endpoint>,
    /// Write the one-line join result here once the node joined, its disk is
    /// unlocked and the kubelet's credentials are in place, before serving
    /// --attest-listen (which does not return): the signal a boot script
    /// waits for to go on.
    #[arg(long, env = "CONFIDENTIAL_JOINED_FILE")]
    pub joined_file: Option<PathBuf>,
    /// When no gate can be reached after --max-attempts rounds (the control
    /// plane is gone), serve the recovery endpoint over aTLS on this address
    /// and wait for `kubectl confidential recover` instead of exiting. Only
    /// a node that joined before (its cluster ID is in --cluster-id-state)
    /// recovers.
    #[arg(long, env = "CONFIDENTIAL_RECOVERY_LISTEN")]
    pub recovery_listen: Option<SocketAddr>,
    /// File keeping the cluster ID this node joined (not a secret), so after
    /// a reboot it can show which cluster it belongs to when it recovers.
    /// Default: `cluster-id` beside --ak-state.
    #[arg(long, env = "CONFIDENTIAL_CLUSTER_ID_STATE")]
    pub cluster_id_state: Option<PathBuf>,
}

/// The gate's key pin: SHA-256 of its SubjectPublicKeyInfo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatePin(pub [u8; 32]);

#[derive(Debug, Error, PartialEq, Eq)]
pub enum GatePinError {
    #[error("the gate pin is not hex: {0}")]
    NotHex(String),
    #[error("the gate pin is {0} bytes; a SHA-256 pin is 32 bytes (64 hex digits)")]
    Length(usize),
}

impl FromStr for GatePin {
    type Err = GatePinError;

    /// 64 hex digits; a `sha256:` prefix (kubeadm's pin spelling) is accepted.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.trim().strip_prefix("sha256:").unwrap_or(s.trim());
        let bytes = hex::decode(digits).map_err(|e| GatePinError::NotHex(e.to_string()))?;
        let len = bytes.len();
        <[u8; 32]>::try_from(bytes)
            .map(GatePin)
            .map_err(|_| GatePinError::Length(len))
    }
}

impl std::fmt::Display for GatePin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// Evidence kinds the bootstrapper can produce.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum EvidenceKind {
    Tpm,
    Snp,
}

/// Where the state disk key goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DiskTarget {
    /// LUKS2 on `device`, its file system mounted at `mount` when set.
    Luks {
        device: PathBuf,
        mount: Option<PathBuf>,
    },
    /// Written to this file (mode 0600).
    KeyFile(PathBuf),
    /// No state disk: the key is not used.
    None,
}

/// How the kubelet is started after a first join.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KubeletStart {
    /// `kubeadm join` with the token and CA pin.
    Kubeadm,
    /// Write a bootstrap kubeconfig for a kubelet started by someone else.
    BootstrapKubeconfig(PathBuf),
}

/// The evidence source with what it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EvidenceConfig {
    Tpm {
        tcti: String,
        pcrs: Vec<u32>,
        ak_state: PathBuf,
        cluster_id_pcr: u32,
    },
    Snp {
        vcek: Option<PathBuf>,
    },
}

/// A validated launch configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub endpoints: Vec<String>,
    pub gate_pin: GatePin,
    pub node_name: String,
    pub pool: Option<String>,
    pub disk_uuid: String,
    pub evidence: EvidenceConfig,
    pub disk: DiskTarget,
    pub rejoin: bool,
    pub kubelet: KubeletStart,
    pub max_attempts: u32,
    pub attest_listen: Option<SocketAddr>,
    pub attest_advertise: Option<Endpoint>,
    pub joined_file: Option<PathBuf>,
    /// Where to serve recovery when the gate cannot be reached.
    pub recovery_listen: Option<SocketAddr>,
    pub cluster_id_state: PathBuf,
}

/// A flag combination or value the bootstrapper refuses.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--endpoint {0}")]
    Endpoint(EndpointError),
    #[error("--node-name {0:?} is not a valid node name (lowercase RFC 1123 subdomain)")]
    NodeName(String),
    #[error("--disk-uuid {0:?} is not a UUID (8-4-4-4-12 hex digits)")]
    DiskUuid(String),
    #[error("--pcrs {0} is not a PCR index (0-23)")]
    Pcr(u32),
    #[error("--pcrs is empty: name the PCRs the AttestationPolicy expects")]
    NoPcrs,
    #[error("--cluster-id-pcr {0} is not a PCR index (0-23)")]
    ClusterIdPcr(u32),
    #[error("--snp-vcek is only used with --evidence snp")]
    VcekWithoutSnp,
    #[error(
        "--recovery-listen needs --max-attempts N (N > 0): the node serves recovery only after N rounds failed to reach the gate"
    )]
    RecoveryNeedsBoundedJoin,
    #[error(
        "--recovery-listen needs --evidence tpm: recovery checks TPM evidence (the cluster-ID PCR) in this version"
    )]
    RecoveryNeedsTpm,
}

/// The highest PCR index of a TPM 2.0 PC client (24 PCRs).
const MAX_PCR: u32 = 23;

impl Args {
    /// Validates the flags into a [`Config`]; nothing is touched yet.
    pub fn validate(self) -> Result<Config, ConfigError> {
        for e in &self.endpoints {
            e.parse::<Endpoint>().map_err(ConfigError::Endpoint)?;
        }
        if !confidential_api::keys::is_valid_node_name(&self.node_name) {
            return Err(ConfigError::NodeName(self.node_name));
        }
        if !confidential_attestation::kdf::is_valid_disk_uuid(&self.disk_uuid) {
            return Err(ConfigError::DiskUuid(self.disk_uuid));
        }
        let cluster_id_state = self
            .cluster_id_state
            .unwrap_or_else(|| self.ak_state.with_file_name("cluster-id"));
        let evidence = match self.evidence {
            EvidenceKind::Tpm => {
                if self.snp_vcek.is_some() {
                    return Err(ConfigError::VcekWithoutSnp);
                }
                if self.pcrs.is_empty() {
                    return Err(ConfigError::NoPcrs);
                }
                if let Some(bad) = self.pcrs.iter().find(|p| **p > MAX_PCR) {
                    return Err(ConfigError::Pcr(*bad));
                }
                if self.cluster_id_pcr > MAX_PCR {
                    return Err(ConfigError::ClusterIdPcr(self.cluster_id_pcr));
                }
                EvidenceConfig::Tpm {
                    tcti: self.tcti,
                    pcrs: self.pcrs,
                    ak_state: self.ak_state,
                    cluster_id_pcr: self.cluster_id_pcr,
                }
            }
            EvidenceKind::Snp => EvidenceConfig::Snp {
                vcek: self.snp_vcek,
            },
        };
        if self.recovery_listen.is_some() {
            if self.max_attempts == 0 {
                return Err(ConfigError::RecoveryNeedsBoundedJoin);
            }
            if !matches!(evidence, EvidenceConfig::Tpm { .. }) {
                return Err(ConfigError::RecoveryNeedsTpm);
            }
        }
        let disk = match (self.state_device, self.disk_key_file) {
            (Some(device), _) => DiskTarget::Luks {
                device,
                mount: self.state_mount,
            },
            (None, Some(file)) => DiskTarget::KeyFile(file),
            (None, None) => DiskTarget::None,
        };
        let kubelet = match self.kubelet_bootstrap_kubeconfig {
            Some(path) => KubeletStart::BootstrapKubeconfig(path),
            None => KubeletStart::Kubeadm,
        };
        Ok(Config {
            endpoints: self.endpoints,
            gate_pin: self.gate_pin,
            node_name: self.node_name,
            pool: self.pool,
            disk_uuid: self.disk_uuid,
            evidence,
            disk,
            rejoin: self.rejoin,
            kubelet,
            max_attempts: self.max_attempts,
            attest_listen: self.attest_listen,
            attest_advertise: self.attest_advertise,
            joined_file: self.joined_file,
            recovery_listen: self.recovery_listen,
            cluster_id_state,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PIN: &str = "0101010101010101010101010101010101010101010101010101010101010101";

    /// Parses a valid base command line with `extra` replacing or adding
    /// flags.
    fn parse(extra: &[&str]) -> Result<Config, String> {
        let base = [
            ("--endpoint", "127.0.0.1:9443"),
            ("--node-name", "node-a"),
            ("--disk-uuid", "00000000-0000-4000-8000-000000000001"),
            ("--gate-pin", PIN),
        ];
        let mut argv = vec!["confidential-bootstrapper"];
        for (flag, value) in base {
            let given = extra.iter().any(|e| {
                e.strip_prefix(flag)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('='))
            });
            if !given {
                argv.extend([flag, value]);
            }
        }
        argv.extend(extra);
        Args::try_parse_from(argv)
            .map_err(|e| e.to_string())?
            .validate()
            .map_err(|e| e.to_string())
    }

    #[test]
    fn defaults_are_tpm_kubeadm_and_no_disk() {
        let c = parse(&[]).expect("valid");
        assert_eq!(c.gate_pin, GatePin([1; 32]));
        assert_eq!(c.kubelet, KubeletStart::Kubeadm);
        assert_eq!(c.disk, DiskTarget::None);
        assert_eq!(
            c.cluster_id_state,
            PathBuf::from("/var/lib/confidential/cluster-id"),
            "beside the AK state"
        );
        assert_eq!(c.recovery_listen, None);
        assert!(matches!(
            c.evidence,
            EvidenceConfig::Tpm {
                cluster_id_pcr: 15,
                ..
            }
        ));
    }

    #[test]
    fn gate_pin_is_required_and_must_be_32_hex_bytes() {
        let argv = [
            "confidential-bootstrapper",
            "--endpoint",
            "127.0.0.1:9443",
            "--node-name",
            "node-a",
            "--disk-uuid",
            "00000000-0000-4000-8000-000000000001",
        ];
        let err = Args::try_parse_from(argv).expect_err("no pin").to_string();
        assert!(err.contains("--gate-pin"), "{err}");
        let err = parse(&["--gate-pin", "zz"]).expect_err("not hex");
        assert!(err.contains("not hex"), "{err}");
        let err = parse(&["--gate-pin", "0101"]).expect_err("short");
        assert!(err.contains("2 bytes"), "{err}");
        let prefixed = format!("sha256:{PIN}");
        assert_eq!(
            parse(&["--gate-pin", &prefixed])
                .expect("kubeadm spelling")
                .gate_pin,
            GatePin([1; 32])
        );
    }

    #[test]
    fn bad_values_are_refused_one_by_one() {
        for (extra, expected) in [
            (&["--endpoint", "no-port"][..], "is not host:port"),
            (&["--endpoint", "host:0"][..], "the port must be"),
            (&["--endpoint", "user@host:1"][..], "the host must be"),
            (
                &["--attest-advertise", "127.0.0.1:9444"][..],
                "--attest-listen <ATTEST_LISTEN>",
            ),
            (
                &[
                    "--attest-listen",
                    "0.0.0.0:9444",
                    "--attest-advertise",
                    "127.0.0.1",
                ][..],
                "is not host:port",
            ),
            (&["--node-name", "Node_A"][..], "not a valid node name"),
            (&["--node-name=-a"][..], "not a valid node name"),
            (&["--disk-uuid", "../../etc"][..], "not a UUID"),
            (&["--pcrs", "24"][..], "not a PCR index"),
            (&["--cluster-id-pcr", "99"][..], "not a PCR index"),
            (&["--snp-vcek", "/x"][..], "only used with --evidence snp"),
            (
                &["--recovery-listen", "127.0.0.1:9445"][..],
                "--recovery-listen needs --max-attempts",
            ),
            (
                &[
                    "--recovery-listen",
                    "127.0.0.1:9445",
                    "--max-attempts",
                    "3",
                    "--evidence",
                    "snp",
                ][..],
                "--recovery-listen needs --evidence tpm",
            ),
            (&["--evidence", "tdx"][..], "invalid value 'tdx'"),
            (
                &["--state-device", "/dev/vdb", "--disk-key-file", "/k"][..],
                "cannot be used with",
            ),
        ] {
            let err = parse(extra).expect_err(expected);
            assert!(err.contains(expected), "{extra:?}: {err}");
        }
    }

    #[test]
    fn snp_evidence_and_targets() {
        let c = parse(&["--evidence", "snp", "--snp-vcek", "/vcek.der"]).expect("valid");
        assert_eq!(
            c.evidence,
            EvidenceConfig::Snp {
                vcek: Some("/vcek.der".into())
            }
        );
        let c = parse(&["--state-device", "/dev/vdb"]).expect("valid");
        assert_eq!(
            c.disk,
            DiskTarget::Luks {
                device: "/dev/vdb".into(),
                mount: None
            }
        );
        let c = parse(&[
            "--attest-listen",
            "0.0.0.0:9444",
            "--attest-advertise",
            "127.0.0.1:40001",
        ])
        .expect("valid");
        assert_eq!(
            c.attest_advertise.map(|e| e.to_string()).as_deref(),
            Some("127.0.0.1:40001")
        );
        let c = parse(&["--kubelet-bootstrap-kubeconfig", "/k"]).expect("valid");
        assert_eq!(c.kubelet, KubeletStart::BootstrapKubeconfig("/k".into()));
    }
}
