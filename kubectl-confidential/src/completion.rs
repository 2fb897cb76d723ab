//! Shell completion, two ways:
//!
//! - `kubectl confidential completion bash|zsh|fish` prints a script that
//!   completes the `kubectl-confidential` command (generated from the clap
//!   definition, so it never drifts from the real flags);
//! - `kubectl confidential <TAB>` goes through kubectl's plugin completion
//!   (kubectl 1.26+): kubectl runs `kubectl_complete-confidential` with the
//!   words typed so far and reads Cobra's `__complete` answer, candidates one
//!   a line, then `:<directive>`. That helper (shipped in the Krew archive)
//!   is a two-line script calling the hidden `__complete` subcommand here.

use std::io::Write;

use anyhow::Result;
use clap::CommandFactory;
use clap_complete::Shell;

/// The helper kubectl looks for on `PATH` to complete `kubectl confidential`
/// (the same file the Krew archive ships).
pub const KUBECTL_COMPLETE_HELPER: &str = include_str!("../../krew/kubectl_complete-confidential");

/// The hidden first argument kubectl's plugin completion uses (Cobra's name).
pub const COMPLETE_COMMAND: &str = "__complete";

/// Cobra's `ShellCompDirectiveNoFileComp`: do not fall back to file names.
const NO_FILE_COMPLETION: u8 = 4;
/// Cobra's `ShellCompDirectiveDefault`: the shell may complete file names.
const DEFAULT_COMPLETION: u8 = 0;

#[derive(clap::Args, Debug)]
pub struct CompletionArgs {
    /// The shell to print a completion script for, or `kubectl-helper` for
    /// the `kubectl_complete-confidential` script that completes
    /// `kubectl confidential ...` through kubectl.
    #[arg(value_enum)]
    shell: CompletionShell,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
    KubectlHelper,
}

pub fn run(args: &CompletionArgs) -> Result<()> {
    let shell = match args.shell {
        CompletionShell::Bash => Shell::Bash,
        CompletionShell::Zsh => Shell::Zsh,
        CompletionShell::Fish => Shell::Fish,
        CompletionShell::KubectlHelper => {
            print!("{KUBECTL_COMPLETE_HELPER}");
            return Ok(());
        }
    };
    let mut command = crate::Cli::command();
    clap_complete::generate(
        shell,
        &mut command,
        "kubectl-confidential",
        &mut std::io::stdout(),
    );
    Ok(())
}

/// Answers kubectl's plugin completion request for `words` (the last one is
/// the word being completed, possibly empty).
pub fn run_complete(words: &[String]) -> Result<()> {
    let (candidates, directive) = candidates(&crate::Cli::command(), words);
    let mut out = std::io::stdout().lock();
    for candidate in candidates {
        writeln!(out, "{candidate}")?;
    }
    writeln!(out, ":{directive}")?;
    Ok(())
}

/// Candidates for the last of `words` within `root`, and the Cobra
/// directive. Pure: walks the clap command tree along the complete words.
pub fn candidates(root: &clap::Command, words: &[String]) -> (Vec<String>, u8) {
    let (partial, complete) = match words.split_last() {
        Some((last, rest)) => (last.as_str(), rest),
        None => ("", &[][..]),
    };
    let mut command = root;
    let mut expects_value = false;
    for word in complete {
        if expects_value {
            expects_value = false;
            continue;
        }
        if let Some(flag) = word.strip_prefix("--") {
            if !flag.contains('=') {
                expects_value = takes_value(command, root, |a| a.get_long() == Some(flag));
            }
        } else if let Some(short) = word.strip_prefix('-').and_then(|s| s.chars().next()) {
            if word.len() == 2 {
                expects_value = takes_value(command, root, |a| a.get_short() == Some(short));
            }
        } else if let Some(sub) = command
            .get_subcommands()
            .find(|s| s.get_name() == word && !s.is_hide_set())
        {
            command = sub;
        }
    }
    if expects_value {
        // A flag's value (a file, a name): let the shell complete files.
        return (Vec::new(), DEFAULT_COMPLETION);
    }
    let mut out: Vec<String> = if partial.starts_with('-') {
        command
            .get_arguments()
            .chain(root.get_arguments().filter(|a| a.is_global_set()))
            .filter(|a| !a.is_hide_set())
            .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            .filter(|l| l.starts_with(partial))
            .collect()
    } else {
        command
            .get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .map(|s| s.get_name().to_owned())
            .filter(|name| name.starts_with(partial))
            .collect()
    };
    out.sort();
    out.dedup();
    (out, NO_FILE_COMPLETION)
}

fn takes_value(
    command: &clap::Command,
    root: &clap::Command,
    matches: impl Fn(&clap::Arg) -> bool,
) -> bool {
    command
        .get_arguments()
        .chain(root.get_arguments())
        .find(|a| matches(a))
        .is_some_and(|a| a.get_action().takes_values())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &[&str]) -> Vec<String> {
        text.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn completes_subcommands_flags_and_leaves_values_to_the_shell() {
        let root = crate::Cli::command();
        let (top, directive) = candidates(&root, &words(&[""]));
        assert_eq!(directive, NO_FILE_COMPLETION);
        for expected in ["verify", "measurements", "version", "completion", "status"] {
            assert!(top.iter().any(|c| c == expected), "{top:?}");
        }
        assert!(!top.iter().any(|c| c.starts_with("__")), "hidden: {top:?}");
        let (v, _) = candidates(&root, &words(&["ver"]));
        assert_eq!(v, ["verify", "version"]);
        let (flags, _) = candidates(&root, &words(&["verify", "--all"]));
        assert_eq!(flags, ["--all-nodes"]);
        let (global, _) = candidates(&root, &words(&["verify", "--kubec"]));
        assert_eq!(global, ["--kubeconfig"]);
        let (sub, _) = candidates(&root, &words(&["measurements", "f"]));
        assert_eq!(sub, ["fetch"]);
        let (value, directive) = candidates(&root, &words(&["--kubeconfig", ""]));
        assert!(value.is_empty());
        assert_eq!(directive, DEFAULT_COMPLETION);
        let (after_value, _) = candidates(&root, &words(&["--context", "kind", "st"]));
        assert_eq!(after_value, ["status"]);
    }
}
