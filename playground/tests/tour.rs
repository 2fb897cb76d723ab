//! The README's tour, run as CI runs it: `scripts/tour` end to end on real
//! components (control plane, the real plugin, gate, bootstrapper and
//! operator; here on swtpm process machines, `--machines process`).
//! The script itself fails on any step that does not do what the README
//! shows (a refusal that is accepted, a verify that fails, a process left
//! running); this test also checks that every step was reached and that a
//! healthy run prints no ERROR lines. The tour on VM nodes is `vm_tour.rs`.

#[path = "support/tour.rs"]
mod support;

use anyhow::Result;
use support::run_tour;

/// The README's command on process machines (its default, VM nodes, is
/// `vm_tour.rs`).
#[test]
fn the_readme_tour_runs_end_to_end_and_leaves_nothing_running() -> Result<()> {
    run_tour(&[("TOUR_MACHINES", "process")])?;
    Ok(())
}
