//! Making an image available on the daemon (spec §4.2 steps 1–2), under a pull policy.

use bollard::models::ImageInspect;
use bollard::query_parameters::CreateImageOptions;
use futures::StreamExt as _;
use ozfleet_worker_config::ImagePullPolicy;

use super::Engine;
use super::auth;
use super::errors::{daemon_error_text, is_not_found};
use super::reference::ImageRef;

/// Why an image is not usable; the texts follow the reference worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(super) enum ImageError {
    #[error("image {image} is not present locally and image_pull_policy is Never")]
    NotPresent { image: String },
    #[error("failed to pull image {image}: {detail}")]
    Pull { image: String, detail: String },
    #[error("failed to inspect image {image}: {detail}")]
    Inspect { image: String, detail: String },
    #[error("image {image} is for platform {found}, but this worker requires {wanted}")]
    Platform {
        image: String,
        found: String,
        wanted: String,
    },
}

impl Engine {
    /// Makes `image` present per `policy` and checks it is built for the daemon's platform.
    /// `Always` pulls every time (the reference behaviour), `IfNotPresent` only when the
    /// image is absent, `Never` never.
    pub(super) async fn ensure_image(
        &self,
        image: &str,
        policy: ImagePullPolicy,
    ) -> Result<ImageInspect, ImageError> {
        let inspect = match policy {
            ImagePullPolicy::Always => {
                self.pull(image).await?;
                self.inspect_image(image).await?
            }
            ImagePullPolicy::IfNotPresent => match self.inspect_image(image).await? {
                Some(inspect) => Some(inspect),
                None => {
                    self.pull(image).await?;
                    self.inspect_image(image).await?
                }
            },
            ImagePullPolicy::Never => self.inspect_image(image).await?,
        };
        let Some(inspect) = inspect else {
            return Err(match policy {
                ImagePullPolicy::Never => ImageError::NotPresent {
                    image: image.to_owned(),
                },
                // Pulled, yet the daemon does not know it: report it as a failed pull.
                _ => ImageError::Pull {
                    image: image.to_owned(),
                    detail: "the image is missing after the pull".to_owned(),
                },
            });
        };
        let found = format!(
            "{}/{}",
            inspect.os.as_deref().unwrap_or_default(),
            inspect.architecture.as_deref().unwrap_or_default()
        );
        if found != self.platform {
            return Err(ImageError::Platform {
                image: image.to_owned(),
                found,
                wanted: self.platform.clone(),
            });
        }
        Ok(inspect)
    }

    /// `None` when the daemon has no such image.
    async fn inspect_image(&self, image: &str) -> Result<Option<ImageInspect>, ImageError> {
        match self.docker.inspect_image(image).await {
            Ok(inspect) => Ok(Some(inspect)),
            Err(error) if is_not_found(&error) => Ok(None),
            Err(error) => Err(ImageError::Inspect {
                image: image.to_owned(),
                detail: daemon_error_text(&error),
            }),
        }
    }

    /// Pulls `image` for the daemon's platform, with the Docker CLI's credentials for its
    /// registry when there are any, and drains the progress stream.
    async fn pull(&self, image: &str) -> Result<(), ImageError> {
        let reference = ImageRef::parse(image);
        let credentials = match auth::cli_config_path() {
            Some(path) => match auth::credentials_for(&path, &reference).await {
                Ok(credentials) => credentials,
                Err(error) => {
                    tracing::warn!(
                        image,
                        %error,
                        "cannot read registry credentials; pulling without them"
                    );
                    None
                }
            },
            None => None,
        };
        tracing::info!(
            image,
            authenticated = credentials.is_some(),
            platform = %self.platform,
            "pulling image"
        );
        let options = CreateImageOptions {
            from_image: Some(reference.repository()),
            tag: Some(reference.pull_tag().to_owned()),
            platform: self.platform.clone(),
            ..Default::default()
        };
        let mut progress = self
            .long_requests
            .create_image(Some(options), None, credentials);
        while let Some(item) = progress.next().await {
            item.map_err(|error| ImageError::Pull {
                image: image.to_owned(),
                detail: daemon_error_text(&error),
            })?;
        }
        Ok(())
    }
}
