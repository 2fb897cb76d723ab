//! The SEV-SNP launch values a node image is published with, and their check
//! against a verified report.
//!
//! A valid VCEK signature only says *some* guest on a genuine AMD chip asked
//! for the report. What the guest is comes from fields the secure processor
//! fills in at launch: the launch measurement (firmware, and with measured
//! direct boot the kernel, initrd and command line), the guest policy the host
//! launched it with, and the VMPL the report was requested from. They are
//! compared with values the image publisher signed together with the image's
//! PCRs (see `measurements`), never with values the node sends:
//!
//! - the measurement must equal the signed one;
//! - debugging must be off (a debuggable guest's memory is open to the host),
//!   always, whatever the image says;
//! - a migration agent and SMT are refused unless the signed values allow them
//!   (SMT siblings share caches with the host's other threads);
//! - the VMPL must be the signed one (a report from a less privileged VMPL is
//!   not the guest kernel's, e.g. under an SVSM).
//!
//! All checks are pure and run after the signature check, so they are tested
//! by changing fields of a verified report: the same edits to the raw report
//! break its signature (tested in the parent module).

use super::{SnpError, VerifiedReport};

/// Guest policy bit 16: SMT is allowed.
pub const POLICY_SMT: u64 = 1 << 16;
/// Guest policy bit 18: a migration agent may be associated with the guest.
pub const POLICY_MIGRATE_MA: u64 = 1 << 18;
/// Guest policy bit 19: debugging is allowed.
pub const POLICY_DEBUG: u64 = 1 << 19;

/// What an image's publisher signed about its SEV-SNP launch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnpLaunchPolicy {
    /// The expected 48-byte launch measurement.
    pub measurement: [u8; 48],
    /// The VMPL reports must be requested from.
    pub vmpl: u32,
    /// Whether a guest launched with SMT allowed is accepted.
    pub allow_smt: bool,
    /// Whether a guest launched with a migration agent is accepted.
    pub allow_migration_agent: bool,
}

/// Checks `report` against the launch values of the image it claims to run;
/// an image without signed launch values cannot be attested by SEV-SNP
/// evidence alone (its PCRs say nothing about an SNP launch).
pub fn check_image_launch(
    report: &VerifiedReport,
    expected: Option<&SnpLaunchPolicy>,
) -> Result<(), SnpError> {
    check_launch(report, expected.ok_or(SnpError::NoLaunchPolicy)?)
}

/// Checks `report` against the image's signed launch values.
pub fn check_launch(report: &VerifiedReport, expected: &SnpLaunchPolicy) -> Result<(), SnpError> {
    let policy = report.guest_policy;
    if policy & POLICY_DEBUG != 0 {
        return Err(SnpError::DebugAllowed { policy });
    }
    if report.measurement != expected.measurement {
        return Err(SnpError::Measurement {
            expected: hex::encode(expected.measurement),
            actual: hex::encode(report.measurement),
        });
    }
    if policy & POLICY_MIGRATE_MA != 0 && !expected.allow_migration_agent {
        return Err(SnpError::MigrationAgentAllowed { policy });
    }
    if policy & POLICY_SMT != 0 && !expected.allow_smt {
        return Err(SnpError::SmtAllowed { policy });
    }
    if report.vmpl != expected.vmpl {
        return Err(SnpError::Vmpl {
            expected: expected.vmpl,
            actual: report.vmpl,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snp::tests::sample;
    use crate::snp::verify_report;

    fn verified() -> VerifiedReport {
        let (ev, trust) = sample();
        verify_report(&ev, &trust).expect("AMD sample verifies")
    }

    /// The launch values that match the AMD sample (SMT allowed, VMPL 0).
    fn matching(report: &VerifiedReport) -> SnpLaunchPolicy {
        SnpLaunchPolicy {
            measurement: report.measurement,
            vmpl: 0,
            allow_smt: true,
            allow_migration_agent: false,
        }
    }

    #[test]
    fn the_sample_matches_its_launch_values() {
        let report = verified();
        assert_eq!(check_launch(&report, &matching(&report)), Ok(()));
    }

    #[test]
    fn an_image_without_launch_values_is_refused() {
        let report = verified();
        assert_eq!(
            check_image_launch(&report, None),
            Err(SnpError::NoLaunchPolicy)
        );
        assert_eq!(
            check_image_launch(&report, Some(&matching(&report))),
            Ok(())
        );
    }

    #[test]
    fn another_measurement_is_refused() {
        let report = verified();
        let mut expected = matching(&report);
        expected.measurement[47] ^= 1;
        assert!(matches!(
            check_launch(&report, &expected),
            Err(SnpError::Measurement { .. })
        ));
    }

    #[test]
    fn debug_is_refused_whatever_the_image_allows() {
        let mut report = verified();
        report.guest_policy |= POLICY_DEBUG;
        let permissive = SnpLaunchPolicy {
            allow_smt: true,
            allow_migration_agent: true,
            ..matching(&report)
        };
        assert_eq!(
            check_launch(&report, &permissive),
            Err(SnpError::DebugAllowed {
                policy: 0x30000 | POLICY_DEBUG
            })
        );
    }

    #[test]
    fn migration_agent_only_when_allowed() {
        let mut report = verified();
        report.guest_policy |= POLICY_MIGRATE_MA;
        let mut expected = matching(&report);
        assert!(matches!(
            check_launch(&report, &expected),
            Err(SnpError::MigrationAgentAllowed { .. })
        ));
        expected.allow_migration_agent = true;
        assert_eq!(check_launch(&report, &expected), Ok(()));
    }

    #[test]
    fn smt_only_when_allowed() {
        // The sample was launched with SMT allowed.
        let report = verified();
        let mut expected = matching(&report);
        expected.allow_smt = false;
        assert_eq!(
            check_launch(&report, &expected),
            Err(SnpError::SmtAllowed { policy: 0x30000 })
        );
        let mut no_smt = report.clone();
        no_smt.guest_policy &= !POLICY_SMT;
        assert_eq!(check_launch(&no_smt, &expected), Ok(()));
    }

    #[test]
    fn another_vmpl_is_refused() {
        let mut report = verified();
        report.vmpl = 2;
        assert_eq!(
            check_launch(&report, &matching(&report)),
            Err(SnpError::Vmpl {
                expected: 0,
                actual: 2
            })
        );
    }
}
