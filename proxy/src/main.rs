//! The `edgegate` command: the daemon (`run`) and the CLI that talks to it;
//! the commands themselves are in `cli`.

use std::process::ExitCode;

use clap::Parser as _;

mod cli;
#[cfg(test)]
mod docs;
mod generate;

fn main() -> ExitCode {
    let exit = match cli::execute(cli::Cli::parse()) {
        Ok(()) => cli::Exit::Success,
        Err(e) => {
            eprintln!("edgegate: {}", cli::report(&e));
            cli::Exit::of(&e)
        }
    };
    exit.into()
}
