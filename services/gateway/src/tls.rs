//! mTLS on the node link: the gateway's server certificate, the fleet CA that signs node
//! certificates, both reloaded when their files change (rotation without a restart), the
//! TLS accept loop, and the node identity a client certificate carries.
//!
//! A node certificate names its node id as a SAN URI `ozfleet-node:<node-id>` (what
//! `ozfleet certs node` writes), a SAN DNS name `<node-id>.nodes.ozfleet`, or, in a
//! certificate with neither, its subject CN. The node API lets a connection attach only
//! as a node its certificate names.
//!
//! Nothing here logs or returns key material: errors name files and what was wrong.

use std::fmt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use futures::stream::FuturesUnordered;
use futures::{FutureExt as _, Stream, StreamExt as _};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, info, warn};

use crate::GatewayError;

/// The SAN URI scheme naming a node: `ozfleet-node:<node-id>`.
pub const NODE_URI_PREFIX: &str = "ozfleet-node:";
/// The SAN DNS suffix naming a node: `<node-id>.nodes.ozfleet`.
pub const NODE_DNS_SUFFIX: &str = ".nodes.ozfleet";
/// How long a connection may take to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the listen backlog.
pub const MAX_PENDING_HANDSHAKES: usize = 256;
/// Longest name shown from a certificate in an error or a log line.
const MAX_SHOWN_NAME: usize = 140;

/// The files of the gateway's node-link TLS: `--tls-cert`, `--tls-key`, `--tls-client-ca`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTlsFiles {
    /// The gateway's certificate chain (PEM), leaf first.
    pub cert: PathBuf,
    /// Its private key (PEM: PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// The fleet CA (PEM) that node certificates must chain to.
    pub client_ca: PathBuf,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_error(message: String) -> GatewayError {
    GatewayError::InvalidConfig(message)
}

/// Reads every certificate of a PEM file.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes =
        std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| format!("{} is not a PEM certificate file", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(certificates)
}

/// Reads a PEM private key; errors never carry the file's contents.
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    let bytes =
        std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|_| {
        format!(
            "{} holds no PEM private key (PKCS#8, SEC1 or PKCS#1)",
            path.display()
        )
    })
}

fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain = read_certificates(cert)?;
    let private_key = read_private_key(key)?;
    CertifiedKey::from_der(chain, private_key, &provider()).map_err(|error| {
        format!(
            "the key in {} does not fit the certificate in {}: {error}",
            key.display(),
            cert.display()
        )
    })
}

fn load_client_verifier(client_ca: &Path) -> Result<Arc<dyn ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(read_certificates(client_ca)?);
    if added == 0 {
        return Err(format!(
            "{} holds no usable CA certificate",
            client_ca.display()
        ));
    }
    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
        .build()
        .map_err(|error| {
            format!(
                "cannot use {} as the client CA: {error}",
                client_ca.display()
            )
        })
}

/// What identifies a file's version: a replaced or rewritten file changes at least one.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamps(paths: &[PathBuf]) -> Option<Vec<FileStamp>> {
    use std::os::unix::fs::MetadataExt as _;
    paths
        .iter()
        .map(|path| {
            std::fs::metadata(path).ok().map(|metadata| FileStamp {
                modified: metadata.modified().ok(),
                len: metadata.len(),
                inode: metadata.ino(),
            })
        })
        .collect()
}

/// A value built from files, rebuilt when they change (checked on every use, which is
/// one `stat` per file per handshake). A change that does not load (a half-written
/// file, a key that does not fit its certificate yet) keeps the previous value and is
/// tried again on the next use.
struct Reloading<T: ?Sized> {
    what: &'static str,
    paths: Vec<PathBuf>,
    load: fn(&[PathBuf]) -> Result<Arc<T>, String>,
    state: Mutex<ReloadState<T>>,
}

struct ReloadState<T: ?Sized> {
    stamps: Option<Vec<FileStamp>>,
    current: Arc<T>,
    /// The stamps of the last change that failed to load, so it is logged once.
    failed: Option<Vec<FileStamp>>,
}

impl<T: ?Sized> Reloading<T> {
    fn new(
        what: &'static str,
        paths: Vec<PathBuf>,
        load: fn(&[PathBuf]) -> Result<Arc<T>, String>,
    ) -> Result<Self, String> {
        let stamps = stamps(&paths);
        let current = load(&paths)?;
        Ok(Self {
            what,
            paths,
            load,
            state: Mutex::new(ReloadState {
                stamps,
                current,
                failed: None,
            }),
        })
    }

    fn current(&self) -> Arc<T> {
        let now = stamps(&self.paths);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if now.is_some() && now != state.stamps {
            match (self.load)(&self.paths) {
                Ok(value) => {
                    info!("Reloaded the node link's {} (its files changed)", self.what);
                    state.current = value;
                    state.stamps = now;
                    state.failed = None;
                }
                Err(error) => {
                    if state.failed != now {
                        warn!(
                            "The node link's {} changed but cannot be loaded; keeping the previous one: {error}",
                            self.what
                        );
                        state.failed = now;
                    }
                }
            }
        }
        state.current.clone()
    }
}

/// The gateway's certificate, reloaded when `--tls-cert` or `--tls-key` change.
struct ReloadingServerCert(Reloading<CertifiedKey>);

impl fmt::Debug for ReloadingServerCert {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ReloadingServerCert")
            .field("paths", &self.0.paths)
            .finish_non_exhaustive()
    }
}

impl ResolvesServerCert for ReloadingServerCert {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.current())
    }
}

/// The fleet CA's verifier, rebuilt when `--tls-client-ca` changes. Client
/// certificates are mandatory.
struct ReloadingClientVerifier(Reloading<dyn ClientCertVerifier>);

impl fmt::Debug for ReloadingClientVerifier {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter
            .debug_struct("ReloadingClientVerifier")
            .field("paths", &self.0.paths)
            .finish_non_exhaustive()
    }
}

impl ClientCertVerifier for ReloadingClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The CA may change under us; a node has one certificate to offer anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0
            .current()
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.current().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.current().supported_verify_schemes()
    }
}

/// The node link's TLS server side, loaded once (a bad file fails the start) and then
/// reloaded on change.
#[derive(Clone)]
pub struct NodeTls {
    acceptor: TlsAcceptor,
}

impl fmt::Debug for NodeTls {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.debug_struct("NodeTls").finish_non_exhaustive()
    }
}

impl NodeTls {
    pub fn load(files: &NodeTlsFiles) -> Result<Self, GatewayError> {
        let cert = Reloading::new(
            "certificate",
            vec![files.cert.clone(), files.key.clone()],
            |paths| load_certified_key(&paths[0], &paths[1]).map(Arc::new),
        )
        .map_err(|error| tls_error(format!("--tls-cert/--tls-key: {error}")))?;
        let verifier = Reloading::new("client CA", vec![files.client_ca.clone()], |paths| {
            load_client_verifier(&paths[0])
        })
        .map_err(|error| tls_error(format!("--tls-client-ca: {error}")))?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|error| tls_error(format!("TLS: {error}")))?
            .with_client_cert_verifier(Arc::new(ReloadingClientVerifier(verifier)))
            .with_cert_resolver(Arc::new(ReloadingServerCert(cert)));
        // gRPC is HTTP/2; tonic's client insists on it being negotiated.
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(config)),
        })
    }

    /// The connections of `listener` once their handshake succeeded. Handshakes run
    /// concurrently (at most [`MAX_PENDING_HANDSHAKES`], each within
    /// [`HANDSHAKE_TIMEOUT`]), inside the stream itself: dropping it ends them all.
    pub fn incoming(&self, listener: TcpListener) -> TlsIncoming {
        TlsIncoming {
            listener,
            acceptor: self.acceptor.clone(),
            handshakes: FuturesUnordered::new(),
        }
    }
}

type Handshake = BoxFuture<'static, Option<TlsStream<TcpStream>>>;

/// See [`NodeTls::incoming`].
pub struct TlsIncoming {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    handshakes: FuturesUnordered<Handshake>,
}

fn handshake(acceptor: TlsAcceptor, stream: TcpStream, peer: std::net::SocketAddr) -> Handshake {
    async move {
        if let Err(error) = stream.set_nodelay(true) {
            warn!("Cannot set TCP_NODELAY on an accepted connection: {error}");
        }
        match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => Some(stream),
            Ok(Err(error)) => {
                // rustls errors name what failed (unknown issuer, expired, no
                // certificate), never key material.
                warn!("Refused a node connection from {peer}: TLS handshake failed: {error}");
                None
            }
            Err(_) => {
                debug!("A node connection from {peer} did not finish its TLS handshake in time");
                None
            }
        }
    }
    .boxed()
}

impl Stream for TlsIncoming {
    type Item = std::io::Result<TlsStream<TcpStream>>;

    fn poll_next(mut self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        loop {
            while self.handshakes.len() < MAX_PENDING_HANDSHAKES {
                match self.listener.poll_accept(context) {
                    Poll::Ready(Ok((stream, peer))) => {
                        let acceptor = self.acceptor.clone();
                        self.handshakes.push(handshake(acceptor, stream, peer));
                    }
                    // tonic logs it and asks again.
                    Poll::Ready(Err(error)) => return Poll::Ready(Some(Err(error))),
                    Poll::Pending => break,
                }
            }
            match self.handshakes.poll_next_unpin(context) {
                Poll::Ready(Some(Some(stream))) => return Poll::Ready(Some(Ok(stream))),
                // A failed handshake: accept or finish others.
                Poll::Ready(Some(None)) => continue,
                // No handshake in progress: the listener's waker is registered.
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// The node ids a client certificate may attach as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateIdentity {
    node_ids: Vec<String>,
}

impl CertificateIdentity {
    /// The identity of a verified chain's leaf (the first certificate).
    pub fn from_chain(chain: &[CertificateDer<'_>]) -> Result<Self, String> {
        let leaf = chain
            .first()
            .ok_or_else(|| "the connection presented no client certificate".to_owned())?;
        Ok(Self {
            node_ids: node_ids_in_certificate(leaf)?,
        })
    }

    pub fn node_ids(&self) -> &[String] {
        &self.node_ids
    }

    pub fn allows(&self, node_id: &str) -> bool {
        self.node_ids.iter().any(|allowed| allowed == node_id)
    }

    /// The names, cut to a readable length, for an error message.
    pub fn describe(&self) -> String {
        if self.node_ids.is_empty() {
            return "no node id".to_owned();
        }
        self.node_ids
            .iter()
            .map(|id| shown(id))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn shown(name: &str) -> String {
    if name.chars().count() <= MAX_SHOWN_NAME {
        name.to_owned()
    } else {
        let cut: String = name.chars().take(MAX_SHOWN_NAME).collect();
        format!("{cut}…")
    }
}

/// The node ids a certificate names: SAN URIs `ozfleet-node:<id>`, SAN DNS names
/// `<id>.nodes.ozfleet`, and, only when the certificate has neither, its subject CN.
pub fn node_ids_in_certificate(der: &[u8]) -> Result<Vec<String>, String> {
    use x509_parser::extensions::GeneralName;
    let (_, certificate) = x509_parser::parse_x509_certificate(der)
        .map_err(|_| "the client certificate cannot be parsed".to_owned())?;
    let mut ids = Vec::new();
    if let Ok(Some(names)) = certificate.subject_alternative_name() {
        for name in &names.value.general_names {
            match name {
                GeneralName::URI(uri) => {
                    if let Some(id) = uri.strip_prefix(NODE_URI_PREFIX) {
                        ids.push(id.to_owned());
                    }
                }
                GeneralName::DNSName(dns) => {
                    if let Some(id) = dns.strip_suffix(NODE_DNS_SUFFIX) {
                        ids.push(id.to_owned());
                    }
                }
                _ => {}
            }
        }
    }
    if ids.is_empty() {
        ids.extend(
            certificate
                .subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_owned),
        );
    }
    ids.retain(|id| ozfleet_proto::node_id::is_valid_node_id(id));
    ids.dedup();
    Ok(ids)
}
