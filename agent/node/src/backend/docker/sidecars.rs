//! Sidecars as named volumes (spec §4.2 step 3): each sidecar image's filesystem is copied
//! once into a volume named after the image's digest, and that volume is bind-mounted
//! into task containers.
//!
//! Differences from the reference, on purpose:
//! - a sidecar image already present is not pulled again (the volume is keyed by digest,
//!   so a re-pull could only matter for a moving tag, and then only for new volumes), and
//!   with the `Never` policy it is never pulled; when it is pulled, the Docker CLI's
//!   credentials for its registry are used like for the task image (the reference pulls
//!   sidecars anonymously, which fails for a private mirror);
//! - the filesystem is copied with the daemon's archive API (export one never-started
//!   container, extract into another that has the volume at `/target`) instead of running
//!   `tar -x` in a container: no container is started, and the sidecar image needs no shell
//!   or tar;
//! - both helper containers are removed (the reference leaks the export container), and a
//!   volume whose population failed is removed so it is never reused half-filled;
//! - the cache is crash-safe: the last step of a fill writes [`COMPLETE_MARKER`] into the
//!   volume, and an existing volume is reused only once the marker was seen in it (checked
//!   once per volume and process with a never-started container and the archive-stat API,
//!   then remembered). A volume without it (an agent killed mid-fill, or a volume filled by
//!   an ozfleet without markers) is removed, with the helper containers a killed fill left
//!   behind, and filled again; while a container still uses it, the task fails with a
//!   message naming the volume;
//! - populations and checks of the same volume within one process are serialised, so
//!   concurrent tasks do not fill one volume twice at the same time. (Agents in other
//!   processes on the same daemon are not coordinated with.)

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::images::SidecarChecks;
use bollard::models::{BollardDate, ContainerCreateBody, HostConfig, VolumeCreateRequest};
use bollard::query_parameters::{
    ContainerArchiveInfoOptions, CreateContainerOptions, ListContainersOptions,
    RemoveContainerOptions, RemoveVolumeOptions, UploadToContainerOptions,
};
use futures::TryStreamExt as _;
use ozfleet_proto::oz::SidecarMount;
use ozfleet_worker_config::ImagePullPolicy;

use super::errors::{daemon_error_text, is_not_found};
use super::naming::sanitise;
use super::{Engine, LABEL_MANAGED, LABEL_SIDECAR_IMAGE};

/// Where the volume is mounted in the helper containers that fill and check it.
const FILL_TARGET: &str = "/target";
/// File written into a sidecar volume as the last step of filling it: a volume without it
/// was not filled completely. The name cannot clash with the content of an image that does
/// not try to.
const COMPLETE_MARKER: &str = ".ozfleet-sidecar-complete";
/// Label on sidecar helper containers naming the volume they fill or check.
const LABEL_SIDECAR_VOLUME: &str = "dev.ozfleet.sidecar-volume";
/// Size of a tar block.
const TAR_BLOCK: usize = 512;

/// What this process knows about each sidecar volume, by name; a volume's entry is locked
/// while the volume is looked up, checked or filled. Shared by every backend of the
/// process: they may well talk to the same daemon.
static VOLUMES: LazyLock<Mutex<HashMap<String, Arc<tokio::sync::Mutex<VolumeState>>>>> =
    LazyLock::new(Mutex::default);

#[derive(Default)]
struct VolumeState {
    /// `Some(created_at)`, as the daemon reported it, of the volume this process last found
    /// or made complete. A volume of the same name created since (removed and created
    /// again by someone else) reads differently and is checked again; so is one changed at
    /// its top level (the local driver derives `CreatedAt` from the data directory's change
    /// time), which costs one more check.
    complete: Option<Option<BollardDate>>,
}

/// A validated sidecar.
#[derive(Debug, Clone)]
pub(super) struct Sidecar {
    pub image: String,
    pub mount_path: String,
    pub read_write: bool,
}

/// Rejects empty images, empty mount paths and duplicate mount paths (reference texts).
pub(super) fn validate(sidecars: &[SidecarMount]) -> Result<Vec<Sidecar>, String> {
    let mut checks = SidecarChecks::default();
    sidecars
        .iter()
        .map(|sidecar| {
            SidecarChecks::required_fields(sidecar)?;
            checks.unique_mount_path(sidecar)?;
            Ok(Sidecar {
                image: sidecar.image.clone(),
                mount_path: sidecar.mount_path.clone(),
                read_write: sidecar.read_write,
            })
        })
        .collect()
}

/// `<familiar repository, sanitised>-<first 12 hex chars of the digest>`, e.g.
/// `warpdotdev-warp-agent-0123456789ab`; without a hex digest, the whole digest with ':'
/// replaced.
pub(super) fn volume_name(image: &str, digest: &str) -> String {
    let repository = super::reference::ImageRef::parse(image).familiar_repository();
    let base = sanitise(&repository);
    let hex = digest.split_once(':').map_or(digest, |(_, hex)| hex);
    let suffix = if hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        hex[..12].to_owned()
    } else {
        digest.replace(':', "-")
    };
    format!("{base}-{suffix}")
}

/// The bind of a prepared sidecar volume.
pub(super) fn bind(volume: &str, sidecar: &Sidecar) -> String {
    if sidecar.read_write {
        format!("{volume}:{}", sidecar.mount_path)
    } else {
        format!("{volume}:{}:ro", sidecar.mount_path)
    }
}

impl Engine {
    /// Makes a volume for every sidecar and returns the binds, in order.
    pub(super) async fn prepare_sidecars(
        self: Arc<Self>,
        sidecars: Vec<Sidecar>,
        task_id: String,
    ) -> Result<Vec<String>, String> {
        let mut binds = Vec::with_capacity(sidecars.len());
        for sidecar in &sidecars {
            let volume = self
                .sidecar_volume(&sidecar.image, &task_id)
                .await
                .map_err(|error| format!("failed to prepare sidecar {}: {error}", sidecar.image))?;
            binds.push(bind(&volume, sidecar));
        }
        Ok(binds)
    }

    /// The volume holding `image`'s filesystem, created and filled when missing, and
    /// removed and filled again when incomplete.
    async fn sidecar_volume(&self, image: &str, task_id: &str) -> Result<String, String> {
        let policy = match self.pull_policy {
            ImagePullPolicy::Never => ImagePullPolicy::Never,
            ImagePullPolicy::Always | ImagePullPolicy::IfNotPresent => {
                ImagePullPolicy::IfNotPresent
            }
        };
        let inspect = self
            .ensure_image(image, policy)
            .await
            .map_err(|error| error.to_string())?;
        let digest = inspect
            .repo_digests
            .as_deref()
            .and_then(|digests| digests.first())
            .and_then(|digest| digest.split_once('@'))
            .map(|(_, digest)| digest.to_owned())
            .or(inspect.id)
            .ok_or("the daemon reported neither a digest nor an id for the image")?;
        let volume = volume_name(image, &digest);

        let state = {
            let mut volumes = VOLUMES.lock().unwrap_or_else(PoisonError::into_inner);
            Arc::clone(volumes.entry(volume.clone()).or_default())
        };
        let mut state = state.lock().await;
        match self.docker.inspect_volume(&volume).await {
            Ok(found) => {
                if state.complete.as_ref() == Some(&found.created_at) {
                    tracing::debug!(task_id, image, volume, "reusing sidecar volume");
                    return Ok(volume);
                }
                if self.volume_complete(image, &volume).await? {
                    tracing::debug!(task_id, image, volume, "reusing complete sidecar volume");
                    state.complete = Some(found.created_at);
                    return Ok(volume);
                }
                tracing::warn!(
                    task_id,
                    image,
                    volume,
                    "sidecar volume has no completion marker (its filling never finished); \
                     filling it again"
                );
                self.discard_incomplete(&volume).await?;
            }
            Err(error) if is_not_found(&error) => {}
            Err(error) => {
                return Err(format!(
                    "failed to inspect volume {volume}: {}",
                    daemon_error_text(&error)
                ));
            }
        }

        state.complete = None;
        tracing::info!(task_id, image, volume, "creating sidecar volume");
        let labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_SIDECAR_IMAGE.to_owned(), image.to_owned()),
        ]);
        self.docker
            .create_volume(VolumeCreateRequest {
                name: Some(volume.clone()),
                labels: Some(labels),
                ..Default::default()
            })
            .await
            .map_err(|error| {
                format!(
                    "failed to create volume {volume}: {}",
                    daemon_error_text(&error)
                )
            })?;
        if let Err(error) = self.fill_volume(image, &volume).await {
            // An empty or partial volume must not be found by the next task.
            if let Err(remove_error) = self
                .docker
                .remove_volume(&volume, Some(RemoveVolumeOptions { force: true }))
                .await
            {
                tracing::warn!(
                    volume,
                    error = %daemon_error_text(&remove_error),
                    "failed to remove the partly filled sidecar volume"
                );
            }
            return Err(error);
        }
        // Read after the fill, as the local driver's `CreatedAt` follows changes at the top
        // of the volume. Unanswered, the next task checks the marker.
        state.complete = self
            .docker
            .inspect_volume(&volume)
            .await
            .ok()
            .map(|filled| filled.created_at);
        tracing::info!(task_id, image, volume, "sidecar volume ready");
        Ok(volume)
    }

    /// Whether `volume` holds [`COMPLETE_MARKER`], looked up through a never-started
    /// container that mounts it.
    async fn volume_complete(&self, image: &str, volume: &str) -> Result<bool, String> {
        let helper = self
            .create_helper(image, volume, Some(format!("{volume}:{FILL_TARGET}:ro")))
            .await
            .map_err(|error| {
                format!("failed to create a container to check volume {volume}: {error}")
            })?;
        let options = ContainerArchiveInfoOptions {
            path: format!("{FILL_TARGET}/{COMPLETE_MARKER}"),
        };
        let stat = self
            .docker
            .get_container_archive_info(&helper, Some(options))
            .await;
        self.remove_helper(&helper).await;
        match stat {
            Ok(_) => Ok(true),
            Err(error) if is_not_found(&error) => Ok(false),
            Err(error) => Err(format!(
                "failed to check volume {volume} for its completion marker: {}",
                daemon_error_text(&error)
            )),
        }
    }

    /// Removes the incomplete `volume` and the helper containers an unfinished fill left
    /// holding it. The caller holds the volume's lock, so none of them belongs to a fill
    /// of this process that is still running.
    async fn discard_incomplete(&self, volume: &str) -> Result<(), String> {
        let filters = HashMap::from([
            (
                "label".to_owned(),
                vec![
                    format!("{LABEL_MANAGED}=true"),
                    LABEL_SIDECAR_IMAGE.to_owned(),
                ],
            ),
            ("status".to_owned(), vec!["created".to_owned()]),
        ]);
        let options = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let helpers = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|error| {
                format!(
                    "failed to list the helper containers of volume {volume}: {}",
                    daemon_error_text(&error)
                )
            })?;
        for helper in helpers {
            // Helpers of ozfleets before the volume label are found by their mount.
            let labelled = helper
                .labels
                .as_ref()
                .and_then(|labels| labels.get(LABEL_SIDECAR_VOLUME))
                .is_some_and(|labelled| labelled == volume);
            let mounts = helper
                .mounts
                .iter()
                .flatten()
                .any(|mount| mount.name.as_deref() == Some(volume));
            if let Some(id) = helper.id.filter(|_| labelled || mounts) {
                tracing::info!(
                    container = id,
                    volume,
                    "removing a helper container of an unfinished sidecar fill"
                );
                self.remove_helper(&id).await;
            }
        }
        match self
            .docker
            .remove_volume(volume, None::<RemoveVolumeOptions>)
            .await
        {
            Ok(()) => Ok(()),
            Err(error) if is_not_found(&error) => Ok(()),
            Err(error) => Err(format!(
                "sidecar volume {volume} is incomplete (its filling never finished) and cannot \
                 be removed to fill it again: {}; remove it (docker volume rm {volume}) once no \
                 container uses it",
                daemon_error_text(&error)
            )),
        }
    }

    /// Copies `image`'s filesystem into `volume`, then writes [`COMPLETE_MARKER`].
    async fn fill_volume(&self, image: &str, volume: &str) -> Result<(), String> {
        let source = self
            .create_helper(image, volume, None)
            .await
            .map_err(|error| format!("failed to create export container: {error}"))?;
        let target = match self
            .create_helper(image, volume, Some(format!("{volume}:{FILL_TARGET}")))
            .await
        {
            Ok(target) => target,
            Err(error) => {
                self.remove_helper(&source).await;
                return Err(format!("failed to create extraction container: {error}"));
            }
        };
        let export = self
            .long_requests
            .export_container(&source)
            .map_err(|error| std::io::Error::other(daemon_error_text(&error)));
        let copied = self
            .long_requests
            .upload_to_container(
                &target,
                Some(UploadToContainerOptions {
                    path: FILL_TARGET.to_owned(),
                    ..Default::default()
                }),
                bollard::body_try_stream(export),
            )
            .await
            .map_err(|error| {
                format!(
                    "failed to copy the sidecar filesystem: {}",
                    daemon_error_text(&error)
                )
            });
        self.remove_helper(&source).await;
        let filled = match copied {
            Ok(()) => self.mark_complete(&target, image).await,
            Err(error) => Err(error),
        };
        self.remove_helper(&target).await;
        filled
    }

    /// Writes [`COMPLETE_MARKER`] (naming `image`) into the volume of the extraction
    /// container `target`.
    async fn mark_complete(&self, target: &str, image: &str) -> Result<(), String> {
        let written = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_secs());
        let marker = single_file_tar(COMPLETE_MARKER, format!("{image}\n").as_bytes(), written);
        self.docker
            .upload_to_container(
                target,
                Some(UploadToContainerOptions {
                    path: FILL_TARGET.to_owned(),
                    ..Default::default()
                }),
                bollard::body_try_stream(futures::stream::iter([Ok(marker.into())])),
            )
            .await
            .map_err(|error| {
                format!(
                    "failed to mark the sidecar volume complete: {}",
                    daemon_error_text(&error)
                )
            })
    }

    /// A never-started container of `image` (command `true`) for work on `volume`,
    /// optionally with one bind.
    async fn create_helper(
        &self,
        image: &str,
        volume: &str,
        bind: Option<String>,
    ) -> Result<String, String> {
        let labels = HashMap::from([
            (LABEL_MANAGED.to_owned(), "true".to_owned()),
            (LABEL_SIDECAR_IMAGE.to_owned(), image.to_owned()),
            (LABEL_SIDECAR_VOLUME.to_owned(), volume.to_owned()),
        ]);
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            cmd: Some(vec!["true".to_owned()]),
            labels: Some(labels),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                binds: bind.map(|bind| vec![bind]),
                ..Default::default()
            }),
            ..Default::default()
        };
        self.docker
            .create_container(None::<CreateContainerOptions>, body)
            .await
            .map(|created| created.id)
            .map_err(|error| daemon_error_text(&error))
    }

    async fn remove_helper(&self, id: &str) {
        let options = RemoveContainerOptions {
            force: true,
            ..Default::default()
        };
        if let Err(error) = self.docker.remove_container(id, Some(options)).await
            && !is_not_found(&error)
        {
            tracing::warn!(
                container = id,
                error = %daemon_error_text(&error),
                "failed to remove sidecar helper container"
            );
        }
    }
}

/// A ustar archive of one regular file `name` (at most 100 bytes; mode 0444, owned by
/// root, modified at `mtime` in Unix seconds) holding `content`.
fn single_file_tar(name: &str, content: &[u8], mtime: u64) -> Vec<u8> {
    let mut header = [0u8; TAR_BLOCK];
    let size = format!("{:011o}\0", content.len());
    let mtime = format!("{mtime:011o}\0");
    let fields: [(usize, &[u8]); 10] = [
        (0, name.as_bytes()),
        (100, b"0000444\0"),
        (108, b"0000000\0"),
        (116, b"0000000\0"),
        (124, size.as_bytes()),
        (136, mtime.as_bytes()),
        // The checksum is computed with its own field as spaces.
        (148, b"        "),
        (156, b"0"),
        (257, b"ustar\0"),
        (263, b"00"),
    ];
    for (offset, field) in fields {
        header[offset..offset + field.len()].copy_from_slice(field);
    }
    let checksum: u32 = header.iter().map(|&byte| u32::from(byte)).sum();
    header[148..156].copy_from_slice(format!("{checksum:06o}\0 ").as_bytes());
    let length = TAR_BLOCK + content.len().div_ceil(TAR_BLOCK) * TAR_BLOCK + 2 * TAR_BLOCK;
    let mut archive = Vec::with_capacity(length);
    archive.extend_from_slice(&header);
    archive.extend_from_slice(content);
    archive.resize(length, 0);
    archive
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(image: &str, path: &str) -> SidecarMount {
        SidecarMount {
            image: image.into(),
            mount_path: path.into(),
            read_write: false,
        }
    }

    #[test]
    fn validation_texts() {
        assert_eq!(
            validate(&[mount("", "/agent")]).unwrap_err(),
            "additional sidecar has empty image"
        );
        assert_eq!(
            validate(&[mount("a:1", " ")]).unwrap_err(),
            "additional sidecar a:1 has empty mount path"
        );
        assert_eq!(
            validate(&[mount("a:1", "/agent"), mount("b:1", "/agent")]).unwrap_err(),
            "duplicate mount path /agent for additional sidecar b:1"
        );
        let ok = validate(&[mount("a:1", "/agent"), mount("b:1", "/mnt/b")]).unwrap();
        assert_eq!(ok.len(), 2);
        assert!(validate(&[]).unwrap().is_empty());
    }

    #[test]
    fn volume_names_follow_the_reference() {
        assert_eq!(
            volume_name(
                "docker.io/warpdotdev/warp-agent:latest",
                "sha256:0123456789abcdef0123"
            ),
            "warpdotdev-warp-agent-0123456789ab"
        );
        assert_eq!(
            volume_name(
                "localhost:5999/oz-demo-sidecar:1",
                "sha256:fedcba9876543210"
            ),
            "localhost-5999-oz-demo-sidecar-fedcba987654"
        );
        assert_eq!(volume_name("ubuntu", "weird:xyz"), "ubuntu-weird-xyz");
    }

    #[test]
    fn the_marker_archive_is_one_ustar_file() {
        let archive = single_file_tar(COMPLETE_MARKER, b"img:1\n", 0o1234);
        // Header, one content block, two end blocks.
        assert_eq!(archive.len(), 4 * TAR_BLOCK);
        let header = &archive[..TAR_BLOCK];
        assert_eq!(&header[..COMPLETE_MARKER.len()], COMPLETE_MARKER.as_bytes());
        assert_eq!(header[COMPLETE_MARKER.len()], 0);
        assert_eq!(&header[124..136], b"00000000006\0");
        assert_eq!(&header[136..148], b"00000001234\0");
        assert_eq!(header[156], b'0');
        assert_eq!(&header[257..265], b"ustar\x0000");
        let recorded = std::str::from_utf8(&header[148..154]).unwrap();
        let mut blanked = header.to_vec();
        blanked[148..156].fill(b' ');
        let sum: u32 = blanked.iter().map(|&byte| u32::from(byte)).sum();
        assert_eq!(u32::from_str_radix(recorded, 8).unwrap(), sum);
        assert_eq!(&header[154..156], b"\0 ");
        assert_eq!(&archive[TAR_BLOCK..TAR_BLOCK + 6], b"img:1\n");
        assert!(archive[TAR_BLOCK + 6..].iter().all(|&byte| byte == 0));
    }

    #[test]
    fn binds_are_read_only_unless_asked() {
        let mut sidecar = Sidecar {
            image: "a".into(),
            mount_path: "/agent".into(),
            read_write: false,
        };
        assert_eq!(bind("vol", &sidecar), "vol:/agent:ro");
        sidecar.read_write = true;
        assert_eq!(bind("vol", &sidecar), "vol:/agent");
    }
}
