//! How a command gets its answer from the daemon: one request, and the one
//! kind of answer the command expects, or an [`AskError`] that says why not
//! (which `exit` turns into the exit status).

use edgegate::control::{self, ClientError, DaemonError, Request, Response};

use super::args::Global;

/// Why a command did not get the answer it asked for.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    /// No answer: no daemon, a broken connection, or not root on either end.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The daemon did not carry out the request, and says why.
    #[error(transparent)]
    Daemon(#[from] DaemonError),
    /// An answer to some other request: a daemon of another version?
    #[error("unexpected answer from the daemon")]
    Unexpected,
}

/// Sends `request` and returns what `expected` takes from the answer.
///
/// `expected` matches the one answer the request has and returns `None`
/// for any other, e.g. `|answer| match answer { Response::List { entries,
/// .. } => Some(entries), _ => None }`.
pub fn ask<T>(
    global: &Global,
    request: &Request,
    expected: impl FnOnce(Response) -> Option<T>,
) -> Result<T, AskError> {
    take(control::call(&global.socket(), request)?, expected)
}

/// The answer `expected` takes from `response`; the daemon's error otherwise.
fn take<T>(
    response: Response,
    expected: impl FnOnce(Response) -> Option<T>,
) -> Result<T, AskError> {
    match response {
        Response::Error(error) => Err(AskError::Daemon(error)),
        response => expected(response).ok_or(AskError::Unexpected),
    }
}

#[cfg(test)]
mod tests {
    use edgegate::control::ErrorKind;

    use super::*;

    fn pong(answer: Response) -> Option<()> {
        matches!(answer, Response::Pong).then_some(())
    }

    #[test]
    fn the_expected_answer_is_taken() {
        assert!(matches!(take(Response::Pong, pong), Ok(())));
    }

    #[test]
    fn the_daemons_error_keeps_its_kind_and_words() {
        let refused = Response::error(ErrorKind::Refused, "nothing changed");
        let Err(AskError::Daemon(error)) = take(refused, pong) else {
            panic!("the daemon's error is not an AskError::Daemon");
        };
        assert_eq!(error.kind, ErrorKind::Refused);
        assert_eq!(error.to_string(), "nothing changed");
    }

    #[test]
    fn an_answer_to_another_request_is_unexpected() {
        let other = Response::List { entries: Vec::new(), fleet: None };
        assert!(matches!(take(other, pong), Err(AskError::Unexpected)));
    }

    #[test]
    fn an_error_is_never_handed_to_the_command() {
        // Even a command that would take any answer gets the error as one.
        let internal = Response::error(ErrorKind::Internal, "the daemon failed");
        assert!(matches!(take(internal, Some), Err(AskError::Daemon(_))));
    }
}
