//! The human form of `verify`'s reports: per node a header with the verdict,
//! expected vs actual per PCR with enforced/warn marks, the cluster-ID PCR,
//! the AK's relation to the gate's record, then the problems.

use super::check::{AkRecord, NodeReport, PcrCheck, Verdict};
use crate::output::print_table;

pub fn verdict_word(verdict: Verdict) -> &'static str {
    match verdict {
        Verdict::Trusted => "TRUSTED",
        Verdict::Untrusted => "UNTRUSTED",
    }
}

/// First 16 hex digits: enough to compare by eye; JSON has the full value.
fn short(hex: &str) -> String {
    match hex.get(..16) {
        _ if hex.is_empty() => "(not quoted)".to_owned(),
        Some(prefix) if hex.len() > 16 => format!("{prefix}…"),
        _ => hex.to_owned(),
    }
}

fn row(check: &PcrCheck, label: &str) -> Vec<String> {
    vec![
        format!("{}{label}", check.pcr),
        short(&check.expected),
        short(&check.actual),
        if check.enforced { "enforced" } else { "warn" }.to_owned(),
        if check.matches { "ok" } else { "MISMATCH" }.to_owned(),
    ]
}

pub fn print_reports(reports: &[NodeReport]) {
    for report in reports {
        print_report(report);
    }
    let trusted = reports
        .iter()
        .filter(|r| r.verdict == Verdict::Trusted)
        .count();
    println!("{trusted}/{} nodes trusted", reports.len());
}

/// One node's header, PCR table, AK relation, warnings and problems.
pub fn print_report(report: &NodeReport) {
    println!(
        "NODE {} ({}): {}",
        report.node,
        report.endpoint,
        verdict_word(report.verdict)
    );
    if let Some(kind) = &report.evidence_kind {
        println!(
            "  evidence: {kind}; image: {}",
            report.image.as_deref().unwrap_or("-")
        );
    }
    let mut rows: Vec<Vec<String>> = report.pcrs.iter().map(|c| row(c, "")).collect();
    if let Some(cluster) = &report.cluster_id_pcr {
        rows.push(row(cluster, " (cluster ID)"));
    }
    if !rows.is_empty() {
        print_table(
            &["  PCR", "EXPECTED", "ACTUAL", "MODE", "RESULT"],
            &indent(rows),
        );
    }
    if let (Some(ak), Some(record)) = (&report.ak_fingerprint, report.ak_record) {
        let relation = match record {
            AkRecord::Matches => "the AK the gate activated at join",
            AkRecord::Differs => "NOT the AK the gate activated at join",
            AkRecord::Missing => "not recorded by the gate",
        };
        println!("  attestation key {}: {relation}", short(ak));
    }
    for warning in &report.warnings {
        println!("  warning: {warning}");
    }
    for problem in &report.problems {
        println!("  problem: {problem}");
    }
    println!();
}

fn indent(rows: Vec<Vec<String>>) -> Vec<Vec<String>> {
    rows.into_iter()
        .map(|mut r| {
            if let Some(first) = r.first_mut() {
                *first = format!("  {first}");
            }
            r
        })
        .collect()
}
