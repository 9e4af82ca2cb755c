//! How a client reaches the coordinator: the URL, the shared token, and TLS.
//!
//! `http://` URLs are plain TCP, `https://` URLs are TLS (rustls): the coordinator's
//! certificate is checked against `--tls-ca`, or the system's roots when none is given;
//! `--tls-cert`/`--tls-key` present a client certificate where the coordinator asks for
//! one (mutual TLS).

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::auth::{TOKEN_FILE_ENV, Token};
use crate::refusal::{REFUSAL_KEY, Reason};
use crate::v1::coordinator_client::CoordinatorClient;
use crate::v1::relay_client::RelayClient;
use anyhow::{Context, Result, bail};
use clap::Args;
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A connected client of the coordinator, presenting the token (if any) on every call.
pub type Client = CoordinatorClient<InterceptedService<Channel, Bearer>>;

/// A relay's client of the coordinator's `Relay` service, presenting the token.
pub type BatchClient = RelayClient<InterceptedService<Channel, Bearer>>;

/// Largest reply a client accepts (φ is a few hundred KB even for large optimizers).
pub const MAX_REPLY_BYTES: usize = 64 << 20;

/// Client flags: the token and TLS.
#[derive(Debug, Clone, Default, Args)]
pub struct ClientArgs {
    /// File holding the shared token (or set $L2L_TOKEN to the token itself).
    #[arg(long, env = TOKEN_FILE_ENV, value_name = "PATH")]
    pub token_file: Option<PathBuf>,
    /// PEM CA certificate(s) that signed the coordinator's certificate (https URLs);
    /// without it the system's roots are used.
    #[arg(long, env = "L2L_TLS_CA", value_name = "PATH")]
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate, for a coordinator that requires mutual TLS.
    #[arg(long, env = "L2L_TLS_CERT", value_name = "PATH", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "L2L_TLS_KEY", value_name = "PATH", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Name to check the coordinator's certificate against [default: the URL's host].
    #[arg(long, value_name = "NAME")]
    pub tls_domain: Option<String>,
}

/// The resolved token and TLS settings of a client.
#[derive(Debug, Clone, Default)]
pub struct ClientSecurity {
    /// The shared token, if the coordinator requires one.
    pub token: Option<Token>,
    /// TLS settings, used for `https://` URLs.
    pub tls: Option<ClientTlsConfig>,
    /// Whether a client certificate is presented (mutual TLS).
    pub client_cert: bool,
}

/// Largest PEM file read (a certificate chain is a few KB).
pub const MAX_PEM_BYTES: u64 = 1 << 20;

/// Reads a PEM file (at most [`MAX_PEM_BYTES`]), naming it on failure.
pub fn read_pem(path: &Path, what: &str) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut out = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_PEM_BYTES + 1).read_to_end(&mut out))
        .with_context(|| format!("cannot read the {what} {}", path.display()))?;
    if out.len() as u64 > MAX_PEM_BYTES {
        bail!(
            "the {what} {} is larger than {MAX_PEM_BYTES} bytes; is it the right file?",
            path.display()
        );
    }
    Ok(out)
}

impl ClientArgs {
    /// Reads the token and certificate files for a connection to `url`.
    pub fn resolve(&self, url: &str) -> Result<ClientSecurity> {
        let token = Token::resolve(self.token_file.as_deref())?;
        let https = url.starts_with("https://");
        let any_tls = self.tls_ca.is_some() || self.tls_cert.is_some();
        if !https && any_tls {
            bail!("TLS files were given but the coordinator URL {url} is http://; use https://");
        }
        let tls = if https {
            let mut tls = ClientTlsConfig::new();
            tls = match &self.tls_ca {
                Some(ca) => {
                    tls.ca_certificate(Certificate::from_pem(read_pem(ca, "CA certificate")?))
                }
                None => tls.with_native_roots(),
            };
            if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
                tls = tls.identity(Identity::from_pem(
                    read_pem(cert, "client certificate")?,
                    read_pem(key, "client key")?,
                ));
            }
            if let Some(d) = &self.tls_domain {
                tls = tls.domain_name(d.clone());
            }
            Some(tls)
        } else {
            None
        };
        Ok(ClientSecurity {
            token,
            tls,
            client_cert: self.tls_cert.is_some(),
        })
    }
}

/// Adds the token to every request.
#[derive(Debug, Clone, Default)]
pub struct Bearer(Option<Token>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            t.attach(req.metadata_mut());
        }
        Ok(req)
    }
}

/// An endpoint for `url` with TLS applied, tuned for small frequent requests.
pub fn endpoint(url: &str, security: &ClientSecurity) -> Result<Endpoint> {
    let mut e = Channel::from_shared(url.to_string())
        .with_context(|| {
            format!("bad coordinator URL {url:?}; expected e.g. http://10.0.0.5:50051")
        })?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(8 << 20);
    if let Some(tls) = &security.tls {
        e = e
            .tls_config(tls.clone())
            .context("cannot set up TLS for the coordinator connection")?;
    }
    Ok(e)
}

/// A client over an open channel, presenting the token.
pub fn client(channel: Channel, security: &ClientSecurity) -> Client {
    CoordinatorClient::with_interceptor(channel, Bearer(security.token.clone()))
        .max_decoding_message_size(MAX_REPLY_BYTES)
        .max_encoding_message_size(MAX_REPLY_BYTES)
}

/// A batch client over an open channel, presenting the token; it sends requests of at
/// most `max_request` bytes.
pub fn batch_client(
    channel: Channel,
    security: &ClientSecurity,
    max_request: usize,
) -> BatchClient {
    RelayClient::with_interceptor(channel, Bearer(security.token.clone()))
        .max_decoding_message_size(MAX_REPLY_BYTES)
        .max_encoding_message_size(max_request)
}

/// Connects to `url`, with a per-call timeout of `timeout`.
pub async fn connect(url: &str, security: &ClientSecurity, timeout: Duration) -> Result<Client> {
    let ch = endpoint(url, security)?
        .timeout(timeout)
        .connect()
        .await
        .with_context(|| format!("cannot reach the coordinator at {url}"))?;
    Ok(client(ch, security))
}

/// Advice for a request that failed below gRPC (the connection broke or never spoke
/// HTTP/2), from what this client's own settings make likely. A TLS server that requires
/// client certificates closes the connection of a client without one (the alert
/// `CertificateRequired` may or may not arrive first), and a TLS port answers plain
/// HTTP/2 with nothing a client can parse.
pub fn transport_advice(security: &ClientSecurity, s: &tonic::Status) -> Option<&'static str> {
    // A status the server sent has no source; one made from a transport failure has.
    if s.metadata().get(REFUSAL_KEY).is_some() || std::error::Error::source(s).is_none() {
        return None;
    }
    Some(match (&security.tls, security.client_cert) {
        (Some(_), false) => {
            "the connection closed after the TLS handshake; if the coordinator requires \
             client certificates (mutual TLS), give --tls-cert and --tls-key"
        }
        (Some(_), true) => {
            "the connection closed after the TLS handshake; check that the coordinator \
             trusts the CA that signed --tls-cert"
        }
        (None, _) => {
            "the connection failed before any gRPC answer; if the coordinator serves TLS, \
             use an https:// URL (and --tls-ca)"
        }
    })
}

/// `s` as an error, with [`transport_advice`] as context where there is any.
pub fn explain(security: &ClientSecurity, s: tonic::Status) -> anyhow::Error {
    let advice = transport_advice(security, &s);
    let err = anyhow::Error::new(s);
    match advice {
        Some(a) => err.context(a),
        None => err,
    }
}

/// The one-line advice for a status the coordinator sent when refusing the caller
/// itself rather than a request (wrong token, or no client certificate); such refusals
/// are not retried.
pub fn fatal_refusal(s: &tonic::Status) -> Option<String> {
    // A refusal that names its reason refuses one request (e.g. `bad_session`,
    // `foreign_lease`), not the caller; only `unauthenticated` refuses the caller.
    if s.metadata().get(REFUSAL_KEY).is_some() && Reason::of(s) != Some(Reason::Unauthenticated) {
        return None;
    }
    match s.code() {
        tonic::Code::Unauthenticated => Some(format!(
            "the coordinator refused this worker: {}",
            s.message()
        )),
        tonic::Code::PermissionDenied => Some(format!(
            "the coordinator refused this client ({})",
            s.message()
        )),
        _ => None,
    }
}
