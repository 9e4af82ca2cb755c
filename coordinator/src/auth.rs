//! Who may call: the shared-token check on every RPC of the coordinator service, and
//! the TLS settings of the server.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Result;
use l2l_proto::auth::Token;
use l2l_proto::client::read_pem;
use l2l_proto::refusal::Reason;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::config::SecurityConfig;

/// The resolved security settings of a server.
#[derive(Debug, Clone, Default)]
pub struct ServerSecurity {
    /// The token callers must present; none accepts every caller.
    pub token: Option<Token>,
    /// TLS settings; none serves plain TCP.
    pub tls: Option<ServerTlsConfig>,
}

impl ServerSecurity {
    /// Reads the token (file or `$L2L_TOKEN`) and the certificate files.
    pub fn resolve(c: &SecurityConfig) -> Result<Self> {
        let token = Token::resolve(c.token_file.as_deref())?;
        let tls = match (&c.tls_cert, &c.tls_key) {
            (Some(cert), Some(key)) => {
                let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
                    read_pem(cert, "TLS certificate")?,
                    read_pem(key, "TLS key")?,
                ));
                if let Some(ca) = &c.tls_client_ca {
                    tls = tls.client_ca_root(Certificate::from_pem(read_pem(
                        ca,
                        "client CA certificate",
                    )?));
                }
                Some(tls)
            }
            _ => None,
        };
        Ok(Self { token, tls })
    }
}

/// Checks the token on every request; counts refusals.
#[derive(Debug, Clone)]
pub struct CheckToken {
    token: Option<Token>,
    refused: Arc<AtomicU64>,
}

impl CheckToken {
    /// A check of `token` (none: let every caller in), counting refusals in `refused`.
    pub fn new(token: Option<Token>, refused: Arc<AtomicU64>) -> Self {
        Self { token, refused }
    }
}

impl Interceptor for CheckToken {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        match &self.token {
            Some(t) if !t.accepts(req.metadata()) => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(Reason::Unauthenticated.status(
                    "missing or wrong token: give this client the coordinator's token \
                     (--token-file or $L2L_TOKEN)",
                ))
            }
            _ => Ok(req),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_check_refuses_a_wrong_token_and_counts_it() {
        let token = Token::new("0123456789abcdef0123", "test").unwrap();
        let refused = Arc::new(AtomicU64::new(0));
        let mut check = CheckToken::new(Some(token.clone()), refused.clone());
        let s = check.call(tonic::Request::new(())).unwrap_err();
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert_eq!(Reason::of(&s), Some(Reason::Unauthenticated));
        let mut ok = tonic::Request::new(());
        token.attach(ok.metadata_mut());
        assert!(check.call(ok).is_ok());
        assert_eq!(refused.load(Ordering::Relaxed), 1);
        let mut open = CheckToken::new(None, refused.clone());
        assert!(open.call(tonic::Request::new(())).is_ok(), "no token: open");
    }
}
