//! The API client (spec §5.1): an explicit `kubeconfig`, else the in-cluster service
//! account, else the default loading rules (`KUBECONFIG`, `~/.kube/config`, current
//! context); then a version call proves the server answers.

use std::path::Path;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// Builds the client the configuration selects.
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Client, String> {
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path)
                .map_err(|error| format!("failed to load kubeconfig {}: {error}", path.display()))?;
            Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
                .await
                .map_err(|error| format!("failed to load kubeconfig {}: {error}", path.display()))?
        }
        None => match Config::incluster() {
            Ok(config) => config,
            Err(in_cluster) => Config::from_kubeconfig(&KubeConfigOptions::default())
                .await
                .map_err(|error| {
                    format!(
                        "failed to build Kubernetes client config: not in a cluster ({in_cluster}) and no kubeconfig ({error})"
                    )
                })?,
        },
    };
    let client = Client::try_from(config)
        .map_err(|error| format!("failed to create Kubernetes client: {error}"))?;
    let version = client.apiserver_version().await.map_err(|error| {
        format!(
            "failed to reach Kubernetes API server: {}",
            api_error_text(&error)
        )
    })?;
    tracing::info!(
        server_version = %version.git_version,
        "connected to Kubernetes API server"
    );
    Ok(client)
}

/// The server's own message for API errors (`jobs.batch is forbidden: …`), else the
/// client error.
pub fn api_error_text(error: &kube::Error) -> String {
    match error {
        kube::Error::Api(status) if !status.message.is_empty() => status.message.clone(),
        other => other.to_string(),
    }
}

/// The HTTP status of an API error.
pub fn api_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}
