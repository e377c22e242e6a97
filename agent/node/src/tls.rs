//! The node's side of mTLS on the node link: the CA that signs the gateway's
//! certificate, the node's own certificate and key, and the name the gateway's
//! certificate must carry. Files are read again for every connection, so a rotated
//! certificate or CA is used from the next (re)connection on, without a restart.
//!
//! Errors name files and what is wrong with them, never their contents.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// `--tls-ca`, `--tls-cert`/`--tls-key` and `--gateway-server-name`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA (PEM) the gateway's certificate must chain to.
    pub ca: PathBuf,
    /// The node's certificate chain and private key (PEM), presented to the gateway.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The name the gateway's certificate must carry, instead of the URL's host (for a
    /// gateway reached by IP address, or through a name its certificate does not list).
    pub server_name: Option<String>,
}

impl ClientTls {
    /// Reads the files now (a connection attempt); see the module docs.
    pub fn load(&self) -> anyhow::Result<ClientTlsConfig> {
        let ca = read_pem_certificates(&self.ca).context("--tls-ca")?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca));
        if let Some((cert, key)) = &self.identity {
            let cert_pem = read_pem_certificates(cert).context("--tls-cert")?;
            let key_pem = read_pem_private_key(key).context("--tls-key")?;
            config = config.identity(Identity::from_pem(cert_pem, key_pem));
        }
        if let Some(name) = &self.server_name {
            config = config.domain_name(name.clone());
        }
        Ok(config)
    }
}

/// A PEM file holding at least one certificate, returned as read.
fn read_pem_certificates(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let count = CertificateDer::pem_slice_iter(&bytes)
        .try_fold(0usize, |count, certificate| certificate.map(|_| count + 1))
        .map_err(|_| anyhow::anyhow!("{} is not a PEM certificate file", path.display()))?;
    if count == 0 {
        bail!("{} holds no PEM certificate", path.display());
    }
    Ok(bytes)
}

/// A PEM file holding a private key, returned as read; the error never quotes it.
fn read_pem_private_key(path: &Path) -> anyhow::Result<Vec<u8>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    if PrivateKeyDer::from_pem_slice(&bytes).is_err() {
        bail!(
            "{} holds no PEM private key (PKCS#8, SEC1 or PKCS#1)",
            path.display()
        );
    }
    Ok(bytes)
}
