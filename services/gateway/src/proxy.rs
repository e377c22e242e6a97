//! Reaching Oz through an HTTP proxy, as the reference worker does (Go's
//! `ProxyFromEnvironment`): `HTTPS_PROXY` for `wss://`, `HTTP_PROXY` for `ws://`, unless
//! `NO_PROXY` matches; loopback destinations are never proxied. The tunnel is an HTTP
//! `CONNECT`, so TLS stays end to end between the gateway and Oz.

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use url::Url;

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
        let Some(host) = target.host_str() else {
            return Ok(None);
        };
        let configured = match target.scheme() {
            "wss" | "https" => &self.https_proxy,
            _ => &self.http_proxy,
        };
        let Some(configured) = configured else {
            return Ok(None);
        };
        if is_loopback(host) || self.bypassed(host, target.port_or_known_default()) {
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

    fn bypassed(&self, host: &str, port: Option<u16>) -> bool {
        let Some(no_proxy) = &self.no_proxy else {
            return false;
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_ascii_lowercase();
        no_proxy
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .any(|entry| {
                if entry == "*" {
                    return true;
                }
                let (pattern, entry_port) = split_port(entry);
                if entry_port.is_some() && entry_port != port {
                    return false;
                }
                let pattern = pattern.trim_start_matches('*').to_ascii_lowercase();
                match pattern.strip_prefix('.') {
                    Some(suffix) => host.ends_with(&format!(".{suffix}")) || host == suffix,
                    None => host == pattern || host.ends_with(&format!(".{pattern}")),
                }
            })
    }
}

fn split_port(entry: &str) -> (&str, Option<u16>) {
    match entry.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') || host.ends_with(']') => (
            host.trim_start_matches('[').trim_end_matches(']'),
            port.parse().ok(),
        ),
        _ => (entry, None),
    }
}

fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
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
        let server = tokio::spawn(async move {
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

        let heads = server.await.unwrap();
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
