//! How a command's failure becomes the exit status and the message on
//! stderr. The statuses are documented in docs/cli.md ("Exit status").

use std::{error::Error, process::ExitCode};

use edgegate::{
    allowlist,
    control::{ClientError, ErrorKind},
    fleet::{CommitError, StoreError},
};

use super::ask::AskError;

/// `edgegate`'s exit status, for scripts. Clap exits with 2 itself on an
/// unknown or missing option, before any command runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// The command did what was asked.
    Success = 0,
    /// Any other failure: the daemon failed partway (its message says
    /// whether anything changed), an answer the CLI does not understand, a
    /// file that cannot be read, a check that found problems.
    Failure = 1,
    /// Options that do not go together, as clap's own usage errors.
    Usage = 2,
    /// The daemon, or the CLI checking first, said no, and what was refused
    /// did not change: an invalid or conflicting change, a list over
    /// capacity, files a reload refuses, a fleet rule, not root, `detach`
    /// or `--offline` while the daemon runs.
    Refused = 3,
    /// No answer: no daemon runs (no socket, connection refused), it did
    /// not answer in time or is not root, or the fleet's etcd did not
    /// answer. Try again once it runs. (A connection broken after a change
    /// was sent leaves it unknown whether the change is in force.)
    Unavailable = 4,
}

/// The CLI's own refusal, for what the daemon would refuse too (a list over
/// capacity offline, a stale digest), what a running daemon rules out
/// (`detach`, `--offline`), or a partial answer (a reload whose files were
/// refused).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Options that do not go together, found once they are parsed: a usage
/// error, as clap's.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Usage(pub &'static str);

impl Exit {
    /// The status for `error`: that of its outermost cause of a known kind.
    pub fn of(error: &anyhow::Error) -> Self {
        error.chain().find_map(Self::of_cause).unwrap_or(Self::Failure)
    }

    fn of_cause(cause: &(dyn Error + 'static)) -> Option<Self> {
        if let Some(error) = cause.downcast_ref::<AskError>() {
            return Some(match error {
                AskError::Client(client) => Self::of_client(client),
                AskError::Daemon(daemon) => daemon.kind.into(),
                AskError::Unexpected => Self::Failure,
            });
        }
        if let Some(client) = cause.downcast_ref::<ClientError>() {
            return Some(Self::of_client(client));
        }
        if cause.is::<Usage>() {
            return Some(Self::Usage);
        }
        if cause.is::<Refused>()
            || cause.is::<allowlist::Refusal>()
            || cause.is::<allowlist::ChangeError>()
        {
            return Some(Self::Refused);
        }
        // Fleet changes signed here, and `fleet status --config`, reach etcd
        // without a daemon: classified as the daemon classifies them.
        if let Some(commit) = cause.downcast_ref::<CommitError>() {
            return Some(ErrorKind::from(commit).into());
        }
        cause.downcast_ref::<StoreError>().map(|store| ErrorKind::from(store).into())
    }

    fn of_client(error: &ClientError) -> Self {
        match error {
            ClientError::NotRunning { .. }
            | ClientError::Io { .. }
            | ClientError::NotTheDaemon { .. } => Self::Unavailable,
            // As the daemon refuses a client that is not root.
            ClientError::PermissionDenied { .. } => Self::Refused,
            ClientError::Protocol(_) => Self::Failure,
        }
    }
}

impl From<ErrorKind> for Exit {
    fn from(kind: ErrorKind) -> Self {
        match kind {
            ErrorKind::Refused => Self::Refused,
            ErrorKind::Unavailable => Self::Unavailable,
            ErrorKind::Malformed | ErrorKind::Internal => Self::Failure,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        Self::from(exit as u8)
    }
}

/// The error and its causes, skipping causes that a message already quotes.
pub fn report(error: &anyhow::Error) -> String {
    let mut message = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        if !message.contains(&text) {
            if !message.is_empty() {
                message.push_str(": ");
            }
            message.push_str(&text);
        }
    }
    message
}

#[cfg(test)]
mod tests {
    use std::{io, path::PathBuf};

    use clap::Parser as _;
    use edgegate::{
        allowlist::{Action, Allowlist, ChangeText},
        control::Response,
    };

    use super::*;
    use crate::cli::Cli;

    fn daemon_said(kind: ErrorKind) -> anyhow::Error {
        let Response::Error(error) = Response::error(kind, "no") else { unreachable!() };
        AskError::Daemon(error).into()
    }

    fn client(error: ClientError) -> anyhow::Error {
        AskError::Client(error).into()
    }

    fn socket() -> PathBuf {
        "/run/edgegate/control.sock".into()
    }

    #[test]
    fn each_kind_of_daemon_error_has_its_status() {
        assert_eq!(Exit::of(&daemon_said(ErrorKind::Refused)), Exit::Refused);
        assert_eq!(Exit::of(&daemon_said(ErrorKind::Unavailable)), Exit::Unavailable);
        assert_eq!(Exit::of(&daemon_said(ErrorKind::Malformed)), Exit::Failure);
        assert_eq!(Exit::of(&daemon_said(ErrorKind::Internal)), Exit::Failure);
    }

    #[test]
    fn no_daemon_is_unavailable() {
        let not_running = client(ClientError::NotRunning { socket: socket() });
        assert_eq!(Exit::of(&not_running), Exit::Unavailable);
        let timed_out = io::Error::from(io::ErrorKind::TimedOut);
        let timed_out = client(ClientError::Io { socket: socket(), source: timed_out });
        assert_eq!(Exit::of(&timed_out), Exit::Unavailable);
        let impostor = client(ClientError::NotTheDaemon { socket: socket(), uid: 1000 });
        assert_eq!(Exit::of(&impostor), Exit::Unavailable);
        // `detach` and `--offline` ping the daemon without `ask`.
        let bare = anyhow::Error::from(ClientError::NotRunning { socket: socket() });
        assert_eq!(Exit::of(&bare), Exit::Unavailable);
    }

    #[test]
    fn not_root_is_refused_whichever_end_notices() {
        let socket_mode = client(ClientError::PermissionDenied { socket: socket() });
        assert_eq!(Exit::of(&socket_mode), Exit::Refused);
    }

    #[test]
    fn an_answer_the_cli_cannot_use_is_a_failure() {
        assert_eq!(Exit::of(&AskError::Unexpected.into()), Exit::Failure);
        let garbage = serde_json::from_str::<Response>("{").expect_err("not JSON");
        assert_eq!(Exit::of(&client(ClientError::Protocol(garbage))), Exit::Failure);
    }

    #[test]
    fn options_that_do_not_go_together_are_a_usage_error() {
        let conflict = anyhow::Error::from(Usage("--config goes with --offline or --signing-key"));
        assert_eq!(Exit::of(&conflict), Exit::Usage);
        assert_eq!(Exit::of(&conflict.context("allow add")), Exit::Usage);
        // Clap's own usage errors exit with the same status.
        let unknown = Cli::try_parse_from(["edgegate", "allow", "add", "--no-such-flag"]);
        assert_eq!(unknown.err().map(|e| e.exit_code()), Some(Exit::Usage as i32));
    }

    #[test]
    fn a_change_refused_before_asking_is_refused() {
        let bad = ChangeText::Add {
            action: Action::Allow,
            cidrs: vec!["300.0.0.1".into()],
            comment: None,
        };
        let refusal = bad.parse().expect_err("not an address");
        assert_eq!(Exit::of(&refusal.into()), Exit::Refused);
        let remove = ChangeText::Remove { action: Action::Deny, cidrs: vec!["192.0.2.1".into()] };
        let clash = remove.parse().unwrap().apply_to(&Allowlist::default()).unwrap_err();
        assert_eq!(Exit::of(&clash.into()), Exit::Refused);
        let over_capacity = anyhow::Error::from(Refused("over `max_entries`".into()));
        assert_eq!(Exit::of(&over_capacity), Exit::Refused);
    }

    #[test]
    fn a_signed_change_is_classified_as_the_daemon_would() {
        assert_eq!(Exit::of(&CommitError::Empty.into()), Exit::Refused);
        assert_eq!(Exit::of(&CommitError::Contention.into()), Exit::Unavailable);
    }

    #[test]
    fn context_added_on_the_way_up_keeps_the_status() {
        let refused = daemon_said(ErrorKind::Refused).context("allow add");
        assert_eq!(Exit::of(&refused), Exit::Refused);
    }

    #[test]
    fn any_other_error_is_a_failure() {
        assert_eq!(Exit::of(&anyhow::anyhow!("cannot read list.txt")), Exit::Failure);
    }

    #[test]
    fn usage_errors_keep_claps_status_which_no_other_takes() {
        let usage = Cli::try_parse_from(["edgegate", "allow", "add"]).err().expect("no CIDR");
        assert_eq!(usage.exit_code(), 2);
        for exit in [Exit::Success, Exit::Failure, Exit::Refused, Exit::Unavailable] {
            assert_ne!(exit as i32, usage.exit_code(), "{exit:?}");
        }
    }

    #[test]
    fn the_report_skips_causes_already_quoted() {
        let error = anyhow::anyhow!("disk full").context("cannot write list: disk full");
        assert_eq!(report(&error), "cannot write list: disk full");
        let error = anyhow::anyhow!("disk full").context("cannot write list");
        assert_eq!(report(&error), "cannot write list: disk full");
    }
}
