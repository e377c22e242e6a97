//! Daemon errors as the Docker CLI words them, and the error kinds the backend acts on.

use bollard::errors::Error as DockerError;

use super::DockerSetupError;

/// A socket that does not exist means no daemon runs there, not a bad client setup.
pub(super) fn setup_connect_error(error: DockerError) -> DockerSetupError {
    match error {
        DockerError::SocketNotFoundError(socket) => DockerSetupError::Unreachable(format!(
            "Cannot connect to the Docker daemon at unix://{socket}. Is the docker daemon running?"
        )),
        other => DockerSetupError::Client(other.to_string()),
    }
}

pub(super) fn is_not_found(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

/// A daemon error as the Docker CLI prints it (`Error response from daemon: …`); other
/// errors by their own text.
pub(super) fn daemon_error_text(error: &DockerError) -> String {
    match error {
        DockerError::DockerResponseServerError { message, .. } => {
            format!("Error response from daemon: {message}")
        }
        DockerError::DockerStreamError { error } => error.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_read_like_the_docker_cli() {
        let error = DockerError::DockerResponseServerError {
            status_code: 404,
            message: "No such image: x:1".into(),
        };
        assert!(is_not_found(&error));
        assert_eq!(
            daemon_error_text(&error),
            "Error response from daemon: No such image: x:1"
        );
        assert_eq!(
            daemon_error_text(&DockerError::DockerStreamError {
                error: "manifest unknown".into()
            }),
            "manifest unknown"
        );
    }
}
