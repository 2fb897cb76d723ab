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

#[test]
fn completion_scripts_name_the_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run(&["completion", shell]);
        assert!(out.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&out.stdout);
        assert!(
            script.contains("kubectl-confidential") && script.contains("verify"),
            "{shell}: {script}"
        );
    }
    assert!(!run(&["completion", "powershell"]).status.success());
}

/// kubectl's plugin completion runs the helper, which runs `__complete`
/// with the words typed so far; the answer is Cobra's format.
#[test]
fn kubectl_plugin_completion_answers_in_cobras_format() {
    let helper = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../krew/kubectl_complete-confidential");
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_kubectl-confidential"))
        .parent()
        .expect("bin dir")
        .to_owned();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out = Command::new("sh")
        .arg(&helper)
        .args(["verify", "--all"])
        .env("PATH", &path)
        .output()
        .expect("run the helper");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "--all-nodes\n:4\n");
    let out = run(&["__complete", "measurements", ""]);
    let text = String::from_utf8_lossy(&out.stdout);
    for sub in ["add", "compute", "fetch", "sign", "verify"] {
        assert!(text.lines().any(|l| l == sub), "{text}");
    }
    assert!(text.ends_with(":4\n"), "{text}");
    let out = run(&["completion", "kubectl-helper"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        std::fs::read_to_string(&helper).expect("helper")
    );
}

#[test]
fn verify_help_says_what_it_proves() {
    let out = run(&["verify", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("credential activation"), "{text}");
    let out = run(&["verify", "--node", "x"]);
    assert_eq!(out.status.code(), Some(2), "trust inputs are required");
}
