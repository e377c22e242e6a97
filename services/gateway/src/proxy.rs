//! Reaching Oz through an HTTP proxy, as the reference worker does (Go's
//! `ProxyFromEnvironment`): `HTTPS_PROXY` for `wss://`, `HTTP_PROXY` for `ws://`, unless
//! `NO_PROXY` matches; loopback destinations are never proxied. The tunnel is an HTTP
//! `CONNECT`, so TLS stays end to end between the gateway and Oz.

use std::net::IpAddr;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use url::{Host, Url};

/// Largest proxy response head accepted, so a misbehaving proxy cannot exhaust memory.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;

/// The proxy environment, read once at startup (both spellings, upper case first).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct ProxyEnv {
    pub https_proxy: Option<String>,
    pub http_proxy: Option<String>,
    pub no_proxy: Option<String>,
}

impl std::fmt::Debug for ProxyEnv {
    // Proxy URLs may carry credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyEnv")
            .field("https_proxy", &self.https_proxy.as_ref().map(|_| "<set>"))
            .field("http_proxy", &self.http_proxy.as_ref().map(|_| "<set>"))
            .field("no_proxy", &self.no_proxy)
            .finish()
    }
}

impl ProxyEnv {
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let either = |upper: &str, lower: &str| {
            lookup(upper)
                .or_else(|| lookup(lower))
                .filter(|value| !value.trim().is_empty())
        };
        Self {
            https_proxy: either("HTTPS_PROXY", "https_proxy"),
            http_proxy: either("HTTP_PROXY", "http_proxy"),
            no_proxy: either("NO_PROXY", "no_proxy"),
        }
    }

    pub fn from_process() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// The proxy to reach `target` through, if any.
    pub fn proxy_for(&self, target: &Url) -> Result<Option<Url>, String> {
        let Some(host) = target.host() else {
            return Ok(None);
        };
        let configured = match target.scheme() {
            "wss" | "https" => &self.https_proxy,
            _ => &self.http_proxy,
        };
        let Some(configured) = configured else {
            return Ok(None);
        };
        if is_loopback(&host) || self.bypassed(&host, target.port_or_known_default()) {
            return Ok(None);
        }
        // Like Go, a bare `host:port` means an http:// proxy.
        let with_scheme = if configured.contains("://") {
            configured.clone()
        } else {
            format!("http://{configured}")
        };
        let proxy = Url::parse(&with_scheme)
            .map_err(|error| format!("invalid proxy URL in the environment: {error}"))?;
        if proxy.scheme() != "http" {
            return Err(format!(
                "proxy scheme {:?} is not supported (use an http:// proxy)",
                proxy.scheme()
            ));
        }
        Ok(Some(proxy))
    }

    fn bypassed(&self, host: &Host<&str>, port: Option<u16>) -> bool {
        self.no_proxy
            .as_deref()
            .is_some_and(|no_proxy| NoProxy::parse(no_proxy).matches(host, port))
    }
}

/// `NO_PROXY` with the rules of Go's `golang.org/x/net/http/httpproxy`, which the reference
/// worker follows (hyper-util's matcher follows curl instead: there `.corp.example` also
/// matches `corp.example`, and `host:port` entries never match):
///
/// - `*` alone bypasses the proxy for every destination;
/// - an IP network (`10.0.0.0/8`, `fd00::/8`) matches the IP addresses in it;
/// - an IP address, optionally with a port (`10.1.2.3`, `[::1]:8443`), matches that address
///   (on that port only);
/// - `corp.example` matches the domain and its subdomains, `.corp.example` and
///   `*.corp.example` its subdomains only; either may end in `:port`.
///
/// Entries are separated by commas, case and surrounding spaces do not matter, and an
/// entry that is none of these is ignored.
#[derive(Debug, Default, PartialEq, Eq)]
struct NoProxy {
    everything: bool,
    networks: Vec<IpNetwork>,
    addresses: Vec<(IpAddr, Option<String>)>,
    domains: Vec<DomainEntry>,
}

#[derive(Debug, PartialEq, Eq)]
struct DomainEntry {
    /// With its leading dot: `.corp.example`.
    suffix: String,
    /// The entry had no leading dot, so the domain itself matches too.
    apex_too: bool,
    port: Option<String>,
}

impl NoProxy {
    fn parse(no_proxy: &str) -> Self {
        let mut parsed = Self::default();
        for entry in no_proxy.split(',') {
            let entry = entry.trim().to_ascii_lowercase();
            if entry.is_empty() {
                continue;
            }
            if entry == "*" {
                parsed.everything = true;
                continue;
            }
            if let Some(network) = IpNetwork::parse(&entry) {
                parsed.networks.push(network);
                continue;
            }
            let (host, port) = match split_host_port(&entry) {
                // Go ignores an entry with a port and no host (`:80`).
                Some(("", _)) => continue,
                Some((host, port)) => (host, Some(port.to_owned())),
                None => (entry.as_str(), None),
            };
            if let Ok(address) = host.parse::<IpAddr>() {
                parsed.addresses.push((address.to_canonical(), port));
                continue;
            }
            let host = host
                .strip_prefix('*')
                .filter(|rest| rest.starts_with('.'))
                .unwrap_or(host);
            let (apex_too, domain) = match host.strip_prefix('.') {
                Some(domain) => (false, domain),
                None => (true, host),
            };
            // Destinations are in their ASCII (punycode) form; so are the entries compared
            // with them. Go keeps an entry it cannot convert as it is; so does this.
            let domain = match Host::parse(domain) {
                Ok(Host::Domain(ascii)) => ascii,
                _ => domain.to_owned(),
            };
            parsed.domains.push(DomainEntry {
                suffix: format!(".{domain}"),
                apex_too,
                port,
            });
        }
        parsed
    }

    /// Whether a connection to `host` on `port` bypasses the proxy.
    fn matches(&self, host: &Host<&str>, port: Option<u16>) -> bool {
        if self.everything {
            return true;
        }
        let port = port.map(|port| port.to_string());
        let port_matches = |wanted: &Option<String>| wanted.is_none() || *wanted == port;
        let (name, address) = match *host {
            Host::Domain(domain) => (domain.to_ascii_lowercase(), None),
            Host::Ipv4(address) => (address.to_string(), Some(IpAddr::V4(address))),
            Host::Ipv6(address) => (address.to_string(), Some(IpAddr::V6(address))),
        };
        if let Some(address) = address.map(|address| address.to_canonical()) {
            let listed = self
                .networks
                .iter()
                .any(|network| network.contains(address))
                || self
                    .addresses
                    .iter()
                    .any(|(listed, port)| *listed == address && port_matches(port));
            if listed {
                return true;
            }
        }
        // As in Go, domain entries are compared with IP literals too, as text.
        self.domains.iter().any(|entry| {
            (name.ends_with(&entry.suffix) || (entry.apex_too && name == entry.suffix[1..]))
                && port_matches(&entry.port)
        })
    }
}

/// An IP network in CIDR notation, as Go's `net.ParseCIDR` reads it.
#[derive(Debug, PartialEq, Eq)]
struct IpNetwork {
    address: IpAddr,
    prefix: u8,
}

impl IpNetwork {
    fn parse(text: &str) -> Option<Self> {
        let (address, prefix) = text.split_once('/')?;
        let address: IpAddr = address.parse().ok()?;
        // Go accepts decimal digits only, no sign.
        if prefix.is_empty() || !prefix.bytes().all(|byte| byte.is_ascii_digit()) {
            return None;
        }
        let prefix: u8 = prefix.parse().ok()?;
        let width = if address.is_ipv4() { 32 } else { 128 };
        (prefix <= width).then_some(Self { address, prefix })
    }

    fn contains(&self, address: IpAddr) -> bool {
        match (self.address, address) {
            (IpAddr::V4(network), IpAddr::V4(address)) => {
                same_prefix(&network.octets(), &address.octets(), self.prefix)
            }
            (IpAddr::V6(network), IpAddr::V6(address)) => {
                same_prefix(&network.octets(), &address.octets(), self.prefix)
            }
            _ => false,
        }
    }
}

/// Whether the first `bits` bits of `a` and `b` are equal.
fn same_prefix(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = (usize::from(bits / 8), bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || (a[whole] ^ b[whole]) & (0xff << (8 - rest)) == 0
}

/// Go's `net.SplitHostPort`: `host:port` or `[host]:port` (the port may be empty); `None`
/// for anything else, such as a bare IPv6 address or a name without a port.
fn split_host_port(text: &str) -> Option<(&str, &str)> {
    let colon = text.rfind(':')?;
    let port = &text[colon + 1..];
    let host = match text.strip_prefix('[') {
        Some(rest) => {
            let close = rest.find(']')?;
            // The `]` must sit right before the last colon.
            if close + 2 != colon || rest[..close].contains('[') || port.contains(']') {
                return None;
            }
            &rest[..close]
        }
        None => {
            let host = &text[..colon];
            if host.contains(':') || text.contains(['[', ']']) {
                return None;
            }
            host
        }
    };
    Some((host, port))
}

fn is_loopback(host: &Host<&str>) -> bool {
    match *host {
        Host::Domain(domain) => domain.eq_ignore_ascii_case("localhost"),
        Host::Ipv4(address) => address.is_loopback(),
        Host::Ipv6(address) => address.is_loopback() || address.to_canonical().is_loopback(),
    }
}

/// Opens a TCP tunnel to `host:port` through `proxy` with HTTP CONNECT.
pub async fn connect(proxy: &Url, host: &str, port: u16) -> Result<TcpStream, String> {
    let proxy_host = proxy.host_str().ok_or("the proxy URL has no host")?;
    let proxy_port = proxy.port_or_known_default().unwrap_or(80);
    let shown = format!("{proxy_host}:{proxy_port}");
    let mut stream = TcpStream::connect((proxy_host, proxy_port))
        .await
        .map_err(|error| format!("cannot reach proxy {shown}: {error}"))?;
    let authority = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let mut request = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n");
    if !proxy.username().is_empty() {
        let user = percent_decode(proxy.username());
        let password = percent_decode(proxy.password().unwrap_or(""));
        let token = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        request.push_str(&format!("Proxy-Authorization: Basic {token}\r\n"));
    }
    request.push_str("\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|error| format!("proxy {shown}: {error}"))?;

    let head = read_response_head(&mut stream)
        .await
        .map_err(|error| format!("proxy {shown}: {error}"))?;
    let status_line = head.lines().next().unwrap_or_default();
    let status = status_line.split_whitespace().nth(1).unwrap_or_default();
    if status != "200" {
        return Err(format!("proxy {shown} refused the tunnel: {status_line}"));
    }
    Ok(stream)
}

/// Reads byte by byte up to the blank line, so no byte of the tunnelled stream is consumed.
async fn read_response_head(stream: &mut TcpStream) -> Result<String, String> {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_RESPONSE_HEAD {
            return Err("response head too large".into());
        }
        let byte = stream.read_u8().await.map_err(|error| match error.kind() {
            std::io::ErrorKind::UnexpectedEof => "closed the connection".to_string(),
            _ => error.to_string(),
        })?;
        head.push(byte);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// URL userinfo is percent-encoded; unlike form encoding, `+` stays a plus.
fn percent_decode(text: &str) -> String {
    percent_encoding::percent_decode_str(text)
        .decode_utf8_lossy()
        .into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> ProxyEnv {
        let pairs: Vec<(String, String)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        ProxyEnv::from_lookup(move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        })
    }

    fn proxy(env: &ProxyEnv, target: &str) -> Option<String> {
        env.proxy_for(&Url::parse(target).unwrap())
            .unwrap()
            .map(|url| url.to_string())
    }

    #[test]
    fn the_scheme_picks_the_variable_and_upper_case_wins() {
        let env = env(&[
            ("HTTPS_PROXY", "http://secure-proxy:3128"),
            ("https_proxy", "http://ignored:1"),
            ("http_proxy", "plain-proxy:8080"),
        ]);
        assert_eq!(
            proxy(&env, "wss://oz.warp.dev/ws").as_deref(),
            Some("http://secure-proxy:3128/")
        );
        assert_eq!(
            proxy(&env, "ws://oz.internal/ws").as_deref(),
            Some("http://plain-proxy:8080/")
        );
        assert_eq!(proxy(&ProxyEnv::default(), "wss://oz.warp.dev/ws"), None);
    }

    #[test]
    fn loopback_and_no_proxy_matches_go_direct() {
        let env = env(&[
            ("HTTPS_PROXY", "http://proxy:3128"),
            (
                "NO_PROXY",
                "internal.example, .corp.example,10.1.2.3, oz.example:8443",
            ),
        ]);
        for direct in [
            "wss://localhost/ws",
            "wss://127.0.0.1:9/ws",
            "wss://[::1]/ws",
            "wss://internal.example/ws",
            "wss://a.internal.example/ws",
            "wss://x.corp.example/ws",
            "wss://10.1.2.3/ws",
            "wss://oz.example:8443/ws",
        ] {
            assert_eq!(proxy(&env, direct), None, "{direct}");
        }
        for proxied in [
            "wss://oz.warp.dev/ws",
            "wss://oz.example/ws",
            "wss://notinternal.example/ws",
        ] {
            assert!(proxy(&env, proxied).is_some(), "{proxied}");
        }
        let everything = self::env(&[("HTTPS_PROXY", "http://proxy:3128"), ("no_proxy", "*")]);
        assert_eq!(proxy(&everything, "wss://oz.warp.dev/ws"), None);
    }

    /// Which of `targets` go direct with this `NO_PROXY`, given that a proxy is set.
    fn direct(no_proxy: &str, targets: &[&str]) -> Vec<bool> {
        let env = env(&[
            ("HTTPS_PROXY", "http://proxy:3128"),
            ("HTTP_PROXY", "http://proxy:3128"),
            ("NO_PROXY", no_proxy),
        ]);
        targets
            .iter()
            .map(|target| proxy(&env, target).is_none())
            .collect()
    }

    #[test]
    fn cidr_entries_match_the_addresses_in_the_network_only() {
        assert_eq!(
            direct(
                "10.0.0.0/8, 192.168.1.77/24",
                &[
                    "wss://10.0.0.1/ws",
                    "wss://10.255.255.255:8443/ws",
                    "wss://192.168.1.200/ws",
                    "wss://11.0.0.1/ws",
                    "wss://192.168.2.1/ws",
                    // A name is not resolved to be compared with a network.
                    "wss://ten.example/ws",
                ]
            ),
            [true, true, true, false, false, false]
        );
        assert_eq!(
            direct(
                "fd00::/8",
                &[
                    "wss://[fd12::1]/ws",
                    "wss://[fe80::1]/ws",
                    "wss://10.0.0.1/ws"
                ]
            ),
            [true, false, false]
        );
        // Not networks, so ignored: a bad prefix length.
        assert_eq!(
            direct(
                "10.0.0.0/33, 10.0.0.0/-8, 10.0.0.0/",
                &["wss://10.0.0.1/ws"]
            ),
            [false]
        );
    }

    #[test]
    fn a_leading_dot_matches_subdomains_only_and_a_bare_domain_both() {
        let targets = [
            "wss://corp.example/ws",
            "wss://a.corp.example/ws",
            "wss://a.b.corp.example/ws",
            "wss://notcorp.example/ws",
        ];
        assert_eq!(
            direct(".corp.example", &targets),
            [false, true, true, false]
        );
        assert_eq!(
            direct("*.corp.example", &targets),
            [false, true, true, false]
        );
        assert_eq!(direct("corp.example", &targets), [true, true, true, false]);
        assert_eq!(
            direct("CORP.Example ", &["wss://A.corp.example/ws"]),
            [true],
            "case and spaces do not matter"
        );
    }

    #[test]
    fn a_star_alone_matches_everything() {
        let targets = [
            "wss://oz.warp.dev/ws",
            "ws://10.0.0.1/ws",
            "wss://[2001:db8::1]/ws",
        ];
        assert_eq!(direct("*", &targets), [true, true, true]);
        assert_eq!(direct("foo.example, *", &targets), [true, true, true]);
        // Only alone: `*.example` is a suffix, `*example` nothing Go reads as a wildcard.
        assert_eq!(direct("*example", &targets), [false, false, false]);
    }

    #[test]
    fn an_entry_with_a_port_matches_that_port_only() {
        // wss:// defaults to 443, ws:// to 80.
        let targets = [
            "wss://oz.example:8443/ws",
            "wss://oz.example/ws",
            "ws://oz.example:8443/ws",
            "wss://a.oz.example:8443/ws",
        ];
        assert_eq!(
            direct("oz.example:8443", &targets),
            [true, false, true, true]
        );
        assert_eq!(
            direct("oz.example:443", &targets),
            [false, true, false, false]
        );
        assert_eq!(
            direct(
                "10.1.2.3:443, [2001:db8::1]:8443",
                &[
                    "wss://10.1.2.3/ws",
                    "wss://10.1.2.3:8443/ws",
                    "wss://[2001:db8::1]:8443/ws",
                    "wss://[2001:db8::1]/ws",
                ]
            ),
            [true, false, true, false]
        );
    }

    #[test]
    fn ipv6_literals_match_by_address() {
        let targets = [
            "wss://[2001:db8::1]/ws",
            "wss://[2001:0db8:0:0:0:0:0:1]:8443/ws",
            "wss://[2001:db8::2]/ws",
        ];
        assert_eq!(direct("2001:db8::1", &targets), [true, true, false]);
        assert_eq!(
            direct("[2001:db8::1]", &targets),
            [false, false, false],
            "Go reads a bracketed address without a port as a domain name"
        );
        assert_eq!(direct("2001:DB8::1", &targets), [true, true, false]);
    }

    #[test]
    fn loopback_is_never_proxied_whatever_no_proxy_says() {
        let targets = [
            "wss://localhost/ws",
            "ws://localhost:8080/ws",
            "wss://127.0.0.1/ws",
            "wss://127.8.9.10:9/ws",
            "wss://[::1]:8443/ws",
            "wss://[::ffff:127.0.0.1]/ws",
        ];
        for no_proxy in ["", "other.example", "10.0.0.0/8"] {
            assert_eq!(direct(no_proxy, &targets), [true; 6], "{no_proxy:?}");
        }
        // Only the name `localhost` is loopback; names are never resolved.
        assert_eq!(direct("", &["wss://localhost.example/ws"]), [false]);
    }

    #[test]
    fn host_port_splitting_follows_go() {
        for (entry, split) in [
            ("a.example:80", Some(("a.example", "80"))),
            ("a.example:", Some(("a.example", ""))),
            ("[::1]:443", Some(("::1", "443"))),
            (":80", Some(("", "80"))),
            ("a.example", None),
            ("::1", None),
            ("[::1]", None),
            ("[::1]x:443", None),
            ("a[b]:80", None),
        ] {
            assert_eq!(split_host_port(entry), split, "{entry}");
        }
        assert_eq!(NoProxy::parse(":80, ,"), NoProxy::default());
    }

    #[test]
    fn unsupported_proxies_are_errors_and_credentials_stay_hidden() {
        let env = env(&[("HTTPS_PROXY", "socks5://user:secret@proxy:1080")]);
        let error = env
            .proxy_for(&Url::parse("wss://oz.warp.dev/ws").unwrap())
            .unwrap_err();
        assert!(error.contains("socks5"), "{error}");
        assert!(!format!("{env:?}").contains("secret"));
    }

    #[tokio::test]
    async fn connect_tunnels_with_basic_auth_and_reports_refusals() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let mut server = tokio::task::JoinSet::new();
        server.spawn(async move {
            let mut heads = Vec::new();
            for answer in [
                "HTTP/1.1 200 Connection established\r\n\r\n",
                "HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
            ] {
                let (mut stream, _) = listener.accept().await.unwrap();
                heads.push(read_response_head(&mut stream).await.unwrap());
                stream.write_all(answer.as_bytes()).await.unwrap();
                stream.write_all(b"tunnelled").await.unwrap();
            }
            heads
        });
        let proxy_url = Url::parse(&format!("http://us%40er:p%3As+s@{address}")).unwrap();
        let mut tunnel = connect(&proxy_url, "oz.warp.dev", 443).await.unwrap();
        let mut first = [0u8; 9];
        tunnel.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"tunnelled", "no tunnelled byte is swallowed");

        let error = connect(&proxy_url, "oz.warp.dev", 443).await.unwrap_err();
        assert!(error.contains("407"), "{error}");
        assert!(!error.contains("p:s+s"), "{error}");

        let heads = server.join_next().await.unwrap().unwrap();
        assert!(
            heads[0].starts_with("CONNECT oz.warp.dev:443 HTTP/1.1\r\n"),
            "{}",
            heads[0]
        );
        let token = base64::engine::general_purpose::STANDARD.encode("us@er:p:s+s");
        assert!(
            heads[0].contains(&format!("Proxy-Authorization: Basic {token}\r\n")),
            "{}",
            heads[0]
        );
    }
}
