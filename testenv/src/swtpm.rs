//! A real software TPM per simulated node: Debian's `swtpm` with its own state
//! directory and an EK certificate issued by `swtpm_setup --create-ek-cert`
//! through `swtpm_localca`, pointed at a local CA of our own (a temporary
//! directory, never the system-wide `/var/lib/swtpm-localca`). The CA's
//! issuer certificate is what an AttestationPolicy lists as the trusted EK CA.
//!
//! "Firmware" measurements are real PCR extends (`tpm2_pcrextend` from
//! tpm2-tools), so the test environment itself does not link libtss2.
//! The swtpm process is stopped by pid when [`Swtpm`] is dropped.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::ManagedProcess;

/// A local EK CA (`swtpm_localca` state), shared by the TPMs of one test.
pub struct SwtpmCa {
    dir: TempDir,
}

impl SwtpmCa {
    pub fn new() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("swtpm-ca-").tempdir()?;
        let d = dir.path();
        std::fs::create_dir_all(d.join("ca"))?;
        std::fs::write(
            d.join("setup.conf"),
            format!(
                "create_certs_tool = /usr/bin/swtpm_localca\n\
                 create_certs_tool_config = {0}/localca.conf\n\
                 create_certs_tool_options = {0}/localca.options\n\
                 active_pcr_banks = sha256\n",
                d.display()
            ),
        )?;
        std::fs::write(
            d.join("localca.conf"),
            format!(
                "statedir = {0}/ca\nsigningkey = {0}/ca/signkey.pem\n\
                 issuercert = {0}/ca/issuercert.pem\ncertserial = {0}/ca/certserial\n",
                d.display()
            ),
        )?;
        std::fs::write(
            d.join("localca.options"),
            "--platform-manufacturer kubectl-confidential\n--platform-version 2.1\n--platform-model simulated\n",
        )?;
        Ok(Self { dir })
    }

    fn setup_conf(&self) -> PathBuf {
        self.dir.path().join("setup.conf")
    }

    /// PEM of the CA that signs EK certificates (exists once a TPM was set up).
    pub fn issuer_pem(&self) -> Result<String> {
        let path = self.dir.path().join("ca/issuercert.pem");
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }
}

/// A running swtpm.
pub struct Swtpm {
    // Dropped first: stops the process before its state dir goes away.
    process: ManagedProcess,
    port: u16,
    dir: TempDir,
}

/// A free port `p` with `p + 1` free too: the swtpm TCTI expects the control
/// channel on the next port.
fn free_port_pair() -> Result<u16> {
    for _ in 0..50 {
        let first = TcpListener::bind("127.0.0.1:0")?;
        let port = first.local_addr()?.port();
        if port < u16::MAX && TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no two adjacent free ports")
}

fn run(mut cmd: Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Manufactures a TPM's state in `state`: EK and an EK certificate issued by
/// `ca` (also used for the vTPMs of VMs, `crate::vm`).
pub(crate) fn manufacture(ca: &SwtpmCa, state: &Path) -> Result<()> {
    std::fs::create_dir_all(state)?;
    let mut setup = Command::new("swtpm_setup");
    setup
        .arg("--tpm2")
        .arg("--tpmstate")
        .arg(state)
        .arg("--create-ek-cert")
        .arg("--config")
        .arg(ca.setup_conf());
    run(setup, "swtpm_setup")
}

impl Swtpm {
    /// Manufactures a TPM (EK + EK certificate from `ca`) and starts it.
    pub fn start(ca: &SwtpmCa) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("swtpm-").tempdir()?;
        let state = dir.path().join("state");
        manufacture(ca, &state)?;
        let mut last = None;
        for _ in 0..5 {
            let port = free_port_pair()?;
            let ctrl = port + 1;
            let mut cmd = Command::new("swtpm");
            cmd.arg("socket")
                .arg("--tpm2")
                .arg("--tpmstate")
                .arg(format!("dir={}", state.display()))
                .arg("--server")
                .arg(format!("type=tcp,port={port},bindaddr=127.0.0.1"))
                .arg("--ctrl")
                .arg(format!("type=tcp,port={ctrl},bindaddr=127.0.0.1"))
                .arg("--flags")
                .arg("not-need-init,startup-clear");
            let mut process =
                ManagedProcess::spawn("swtpm", cmd, &dir.path().join(format!("swtpm-{port}.log")))?;
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(Self { process, port, dir });
                }
                if let Err(e) = process.check_running() {
                    last = Some(e);
                    break;
                }
                if Instant::now() > deadline {
                    last = Some(anyhow::anyhow!("swtpm did not listen on {port}"));
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("swtpm did not start")))
    }

    /// TCTI string for tss-esapi / tpm2-tools.
    pub fn tcti(&self) -> String {
        format!("swtpm:host=127.0.0.1,port={}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.pid()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Extends SHA-256 PCR `pcr` with `digest`, as measured boot does.
    pub fn extend(&self, pcr: u32, digest: &[u8; 32]) -> Result<()> {
        let mut cmd = Command::new("tpm2_pcrextend");
        cmd.env("TPM2TOOLS_TCTI", self.tcti())
            .arg(format!("{pcr}:sha256={}", hex_lower(digest)));
        run(cmd, "tpm2_pcrextend")
    }

    /// Power-cycles the TPM, as a machine reboot does: `swtpm_ioctl -i`
    /// (re-initialise, keeping the persistent state: EK, seeds) then
    /// `TPM2_Startup(CLEAR)`, so every PCR is back to zero.
    pub fn reboot(&self) -> Result<()> {
        let mut init = Command::new("swtpm_ioctl");
        init.arg("--tcp")
            .arg(format!("127.0.0.1:{}", self.port + 1))
            .arg("-i");
        run(init, "swtpm_ioctl -i")?;
        let mut startup = Command::new("tpm2_startup");
        startup.env("TPM2TOOLS_TCTI", self.tcti()).arg("-c");
        run(startup, "tpm2_startup -c")
    }

    /// The "firmware": extends each component digest into `pcr`, in order.
    pub fn measure_boot(&self, pcr: u32, components: &[[u8; 32]]) -> Result<()> {
        for digest in components {
            self.extend(pcr, digest)?;
        }
        Ok(())
    }
}

fn hex_lower(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
