//! Shell completions and man pages, generated from the command-line
//! definition itself so that they cannot drift from it: `edgegate
//! completions SHELL`, and `edgegate man --out-dir DIR`, which `cargo xtask
//! dist` runs to put both into the packages.

use std::{io::Write as _, path::Path};

use anyhow::Context as _;
use clap::{Command, CommandFactory as _};
use clap_complete::Shell;

use crate::cli::Cli;

/// Prints the completion script for `shell`.
pub fn completions(shell: Shell) -> anyhow::Result<()> {
    std::io::stdout()
        .write_all(&completion_script(shell))
        .with_context(|| format!("cannot write the {shell} completions"))
}

/// clap_complete panics on a failed write: rendered into memory, where none
/// fails, the script's output can fail as an error (e.g. a closed pipe).
fn completion_script(shell: Shell) -> Vec<u8> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut visible(&Cli::command()), "edgegate", &mut script);
    script
}

/// `command` without its hidden commands and options, recursively:
/// clap_complete offers those too (clap-rs/clap#1335), but `worker`, `man`
/// and `run`'s test-only options are not for typing. Kept is what the
/// generators read of a command: name, description, visible aliases,
/// version (for `--version`), options and subcommands.
fn visible(command: &Command) -> Command {
    let mut visible = Command::new(command.get_name().to_owned())
        .visible_aliases(command.get_visible_aliases().map(str::to_owned))
        .args(command.get_arguments().filter(|arg| !arg.is_hide_set()).cloned())
        .subcommands(command.get_subcommands().filter(|sub| !sub.is_hide_set()).map(visible));
    if let Some(about) = command.get_about() {
        visible = visible.about(about.clone());
    }
    if let Some(version) = command.get_version() {
        visible = visible.version(version.to_owned());
    }
    visible
}

/// Writes `edgegate.1` and a page for every command that is not hidden
/// (`edgegate-allow.1`, `edgegate-allow-add.1`, …) into `dir`.
pub fn man_pages(dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    clap_mangen::generate_to(Cli::command(), dir)
        .with_context(|| format!("cannot write the man pages into {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use clap::ValueEnum as _;

    use super::*;

    #[test]
    fn completions_name_nested_commands_and_not_hidden_ones() {
        for shell in Shell::value_variants() {
            let script = String::from_utf8(completion_script(*shell)).unwrap();
            // (Options without their dashes: fish's `complete -l NAME`.)
            for word in ["edgegate", "allow", "import-aws", "control-socket", "version"] {
                assert!(script.contains(word), "{shell} completions lack {word}");
            }
            // The hidden `worker` command and `run --keys-in-worker`.
            assert!(!script.contains("worker"), "{shell} completions offer a hidden item");
            assert!(!script.contains("out-dir"), "{shell} completions offer the hidden `man`");
        }
    }

    #[test]
    fn man_pages_cover_every_visible_command() {
        let dir = tempfile::tempdir().unwrap();
        man_pages(dir.path()).unwrap();
        let page = |name: &str| std::fs::read_to_string(dir.path().join(name));
        let main = page("edgegate.1").unwrap();
        assert!(main.contains("\n.TH edgegate 1 "), "{main}");
        assert!(main.contains("EDGEGATE_CONTROL_SOCKET"), "{main}");
        assert!(page("edgegate-allow-import-aws.1").unwrap().contains("\\-\\-region"));
        assert!(page("edgegate-fleet-keygen.1").is_ok());
        assert!(page("edgegate-worker.1").is_err(), "a page for the hidden `worker`");
        assert!(page("edgegate-man.1").is_err(), "a page for the hidden `man`");
    }
}
