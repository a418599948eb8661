//! The `edgegate` command line: its definition (`args`), one module per
//! family of commands, how a command asks the daemon (`ask`), and how a
//! failure becomes the exit status (`exit`).

mod allow;
mod args;
mod ask;
mod daemon;
mod exit;
mod fleet;
mod status;

pub use args::Cli;
use args::{Command, FleetCommand};
pub use exit::{Exit, report};

/// Runs the command `cli` names.
pub fn execute(cli: Cli) -> anyhow::Result<()> {
    let Cli { global, command } = cli;
    match command {
        Command::Run(args) => daemon::run(&global, args),
        Command::Worker(args) => daemon::worker(args),
        Command::Check { config } => daemon::check(&config, &global),
        Command::Reload => daemon::reload(&global),
        Command::Demo { duration } => daemon::demo(duration),
        Command::Detach { interface } => daemon::detach(&global, interface.as_deref()),
        Command::Allow { command } => allow::allow(&global, command),
        Command::Deny { command } => allow::deny(&global, command),
        Command::Status { json, top, dropped } => status::status(&global, json, top, dropped),
        Command::Fleet { command: FleetCommand::Status { json, config } } => {
            fleet::status(&global, json, config.as_deref())
        }
        Command::Fleet { command: FleetCommand::Keygen { out } } => fleet::keygen(&out),
        Command::Completions { shell } => crate::generate::completions(shell),
        Command::Man { out_dir } => crate::generate::man_pages(&out_dir),
    }
}
