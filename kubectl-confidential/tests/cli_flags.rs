//! The plugin starts, documents itself and refuses bad flags clearly.

use std::process::Command;

fn run(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kubectl-confidential"))
        .args(args)
        .output()
        .expect("run kubectl-confidential")
}

#[test]
fn help_lists_the_subcommands() {
    let out = run(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for command in ["init", "verify", "upgrade", "status", "recover"] {
        assert!(
            text.contains(command),
            "--help does not mention {command}:\n{text}"
        );
    }
    assert!(
        text.contains("--kubeconfig") && text.contains("--context"),
        "{text}"
    );
}

#[test]
fn version_prints_the_crate_version() {
    let out = run(&["--version"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains(env!("CARGO_PKG_VERSION")));
}

#[test]
fn an_unknown_flag_fails_with_a_clear_message() {
    let out = run(&["--no-such-flag"]);
    assert_eq!(out.status.code(), Some(2));
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("--no-such-flag"), "{text}");
}
