//! `ozfleet certs`: the fleet CA, the gateway's certificate and node certificates for mTLS
//! on the node link. Keys are ECDSA P-256 (PKCS#8 PEM, mode 0600); every file is written
//! to a temporary name and renamed into place, so a gateway or agent reloading it never
//! reads half a file. Replacing existing files (rotation) needs `--force`.

use std::io::Write as _;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand};
use ozfleet_gateway::tls::NODE_URI_PREFIX;
use ozfleet_proto::node_id::{NODE_ID_RULE, is_valid_node_id};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca-key.pem";
pub const GATEWAY_CERT: &str = "gateway.pem";
pub const GATEWAY_KEY: &str = "gateway-key.pem";
const CA_DAYS: u32 = 3650;
const LEAF_DAYS: u32 = 365;

#[derive(Debug, Args)]
pub struct CertsArgs {
    #[command(subcommand)]
    pub command: CertsCommand,
}

#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create the fleet CA: DIR/ca.pem (give it to the gateway and the nodes) and
    /// DIR/ca-key.pem (keep it offline; only `ozfleet certs` needs it).
    Ca {
        #[command(flatten)]
        output: Output,
        /// The CA's common name.
        #[arg(long, default_value = "ozfleet fleet CA")]
        name: String,
    },
    /// A gateway certificate signed by the CA in DIR: DIR/gateway.pem, DIR/gateway-key.pem.
    Gateway {
        #[command(flatten)]
        output: Output,
        /// A DNS name nodes reach the gateway by; repeatable.
        #[arg(long = "dns", value_name = "NAME")]
        dns: Vec<String>,
        /// An IP address nodes reach the gateway by; repeatable.
        #[arg(long = "ip", value_name = "ADDRESS")]
        ips: Vec<IpAddr>,
    },
    /// A node certificate for one node id, signed by the CA in DIR:
    /// DIR/node-<ID>.pem, DIR/node-<ID>-key.pem.
    Node {
        #[command(flatten)]
        output: Output,
        /// The node's id (its `<state-dir>/node-id`; an agent without one adopts the
        /// certificate's).
        #[arg(long)]
        node_id: String,
    },
}

#[derive(Debug, Args)]
pub struct Output {
    /// Where the CA is read from and the files are written.
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,
    /// Validity in days (default: 3650 for the CA, 365 for the others).
    #[arg(long)]
    pub days: Option<u32>,
    /// Replace existing files (rotation: the gateway and agents pick the new ones up).
    #[arg(long)]
    pub force: bool,
}

pub fn run(args: CertsArgs) -> anyhow::Result<ExitCode> {
    for written in create(&args.command)? {
        println!("wrote {}", written.display());
    }
    Ok(ExitCode::SUCCESS)
}

/// Creates what `command` asks for; returns the files written.
pub fn create(command: &CertsCommand) -> anyhow::Result<Vec<PathBuf>> {
    match command {
        CertsCommand::Ca { output, name } => {
            let key = KeyPair::generate().context("cannot generate a key")?;
            let mut params = validity(output.days.unwrap_or(CA_DAYS))?;
            params
                .distinguished_name
                .push(DnType::CommonName, name.as_str());
            // Signs leaf certificates only.
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let certificate = params
                .self_signed(&key)
                .context("cannot create the CA certificate")?;
            write_pair(output, CA_CERT, &certificate.pem(), CA_KEY, &key)
        }
        CertsCommand::Gateway { output, dns, ips } => {
            if dns.is_empty() && ips.is_empty() {
                bail!(
                    "name the gateway as nodes reach it: --dns NAME and/or --ip ADDRESS (repeatable)"
                );
            }
            let mut params = validity(output.days.unwrap_or(LEAF_DAYS))?;
            let common_name = dns
                .first()
                .cloned()
                .unwrap_or_else(|| "ozfleet gateway".to_owned());
            params
                .distinguished_name
                .push(DnType::CommonName, common_name);
            for name in dns {
                let name = name
                    .clone()
                    .try_into()
                    .with_context(|| format!("--dns {name:?} is not a DNS name"))?;
                params.subject_alt_names.push(SanType::DnsName(name));
            }
            params
                .subject_alt_names
                .extend(ips.iter().copied().map(SanType::IpAddress));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
            let (certificate, key) = sign(output, params)?;
            write_pair(output, GATEWAY_CERT, &certificate, GATEWAY_KEY, &key)
        }
        CertsCommand::Node { output, node_id } => {
            if !is_valid_node_id(node_id) {
                bail!("--node-id must be {NODE_ID_RULE}");
            }
            let mut params = validity(output.days.unwrap_or(LEAF_DAYS))?;
            params
                .distinguished_name
                .push(DnType::CommonName, node_id.as_str());
            let uri = format!("{NODE_URI_PREFIX}{node_id}");
            params.subject_alt_names.push(SanType::URI(
                uri.try_into().context("the node id does not fit a URI")?,
            ));
            params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
            let (certificate, key) = sign(output, params)?;
            write_pair(
                output,
                &node_cert_file(node_id),
                &certificate,
                &node_key_file(node_id),
                &key,
            )
        }
    }
}

pub fn node_cert_file(node_id: &str) -> String {
    format!("node-{node_id}.pem")
}

pub fn node_key_file(node_id: &str) -> String {
    format!("node-{node_id}-key.pem")
}

/// Parameters valid from an hour ago (clock skew) for `days`.
fn validity(days: u32) -> anyhow::Result<CertificateParams> {
    if days == 0 {
        bail!("--days must be at least 1");
    }
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(i64::from(days));
    params.use_authority_key_identifier_extension = true;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    Ok(params)
}

/// A fresh key and its certificate, signed by the CA in `--dir`.
fn sign(output: &Output, params: CertificateParams) -> anyhow::Result<(String, KeyPair)> {
    let ca_cert_path = output.dir.join(CA_CERT);
    let ca_key_path = output.dir.join(CA_KEY);
    let ca_cert = std::fs::read_to_string(&ca_cert_path).with_context(|| {
        format!(
            "cannot read the CA certificate {} (create one with `ozfleet certs ca`)",
            ca_cert_path.display()
        )
    })?;
    let ca_key = std::fs::read_to_string(&ca_key_path)
        .with_context(|| format!("cannot read the CA key {}", ca_key_path.display()))?;
    // Never quote the key file in an error.
    let ca_key = KeyPair::from_pem(&ca_key)
        .map_err(|_| anyhow::anyhow!("{} is not a PEM private key", ca_key_path.display()))?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert, ca_key).map_err(|error| {
        anyhow::anyhow!(
            "{} is not a CA certificate: {error}",
            ca_cert_path.display()
        )
    })?;
    let key = KeyPair::generate().context("cannot generate a key")?;
    let certificate = params
        .signed_by(&key, &issuer)
        .context("cannot sign the certificate")?;
    Ok((certificate.pem(), key))
}

/// Writes the key (0600) first, then the certificate (0644), each atomically.
fn write_pair(
    output: &Output,
    cert_name: &str,
    cert_pem: &str,
    key_name: &str,
    key: &KeyPair,
) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&output.dir)
        .with_context(|| format!("cannot create {}", output.dir.display()))?;
    let cert_path = output.dir.join(cert_name);
    let key_path = output.dir.join(key_name);
    if !output.force {
        for path in [&cert_path, &key_path] {
            if path.exists() {
                bail!(
                    "{} exists; pass --force to replace it (rotation)",
                    path.display()
                );
            }
        }
    }
    write_atomically(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&cert_path, cert_pem.as_bytes(), 0o644)?;
    Ok(vec![cert_path, key_path])
}

fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_default();
    let staging = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let _ = std::fs::remove_file(&staging);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&staging)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&staging, path)
    };
    write().with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt as _;

    fn output(dir: &Path, force: bool) -> Output {
        Output {
            dir: dir.to_owned(),
            days: None,
            force,
        }
    }

    #[test]
    fn creates_a_ca_and_certificates_naming_the_node() {
        let dir = tempfile::tempdir().unwrap();
        create(&CertsCommand::Ca {
            output: output(dir.path(), false),
            name: "test CA".into(),
        })
        .unwrap();
        create(&CertsCommand::Gateway {
            output: output(dir.path(), false),
            dns: vec!["gateway.test".into()],
            ips: vec!["127.0.0.1".parse().unwrap()],
        })
        .unwrap();
        let written = create(&CertsCommand::Node {
            output: output(dir.path(), false),
            node_id: "node-7".into(),
        })
        .unwrap();
        for key in [CA_KEY, GATEWAY_KEY, "node-node-7-key.pem"] {
            let mode = std::fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        let chain = ozfleet_gateway::tls::read_certificates(&written[0]).unwrap();
        let ids = ozfleet_gateway::tls::node_ids_in_certificate(&chain[0]).unwrap();
        assert_eq!(ids, ["node-7"]);
        // Existing files stay unless --force.
        let again = CertsCommand::Node {
            output: output(dir.path(), false),
            node_id: "node-7".into(),
        };
        assert!(create(&again).unwrap_err().to_string().contains("--force"));
        let bad = CertsCommand::Node {
            output: output(dir.path(), false),
            node_id: "no spaces".into(),
        };
        assert!(create(&bad).is_err());
    }
}
