//! The shared bearer token: read from a file or the environment, sent by workers as
//! `authorization: Bearer <token>`, checked by the coordinator in constant time.
//!
//! The token is never taken from a command-line argument, where `ps` would show it.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use subtle::ConstantTimeEq;
use tonic::metadata::{AsciiMetadataValue, MetadataMap};

/// The metadata key the token travels in.
pub const HEADER: &str = "authorization";
/// The environment variable that may hold the token itself.
pub const TOKEN_ENV: &str = "L2L_TOKEN";
/// The environment variable that may hold the path of a token file.
pub const TOKEN_FILE_ENV: &str = "L2L_TOKEN_FILE";
/// Shortest token accepted, in bytes.
pub const MIN_LEN: usize = 16;
/// Largest token file read.
pub const MAX_FILE_BYTES: u64 = 4 << 10;

/// Why a token could not be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token file could not be read.
    #[error("cannot read the token file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// The token is unusable (empty, too short, or not printable ASCII).
    #[error("the token from {origin} {why}")]
    Invalid {
        /// Where it came from (a file or the environment variable).
        origin: String,
        /// What is wrong with it.
        why: String,
    },
    /// Both a token file and the environment variable were given.
    #[error(
        "both a token file and ${TOKEN_ENV} are set; give one (unset {TOKEN_ENV} or drop --token-file)"
    )]
    Both,
}

/// A shared secret; its `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// `Bearer <token>`, the exact header value sent and expected.
    header: Arc<str>,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

impl Token {
    /// A token from its text (surrounding whitespace, e.g. a file's newline, is dropped).
    pub fn new(text: &str, origin: &str) -> Result<Self, TokenError> {
        let t = text.trim();
        let invalid = |why: &str| TokenError::Invalid {
            origin: origin.to_string(),
            why: why.to_string(),
        };
        if t.len() < MIN_LEN {
            return Err(invalid(&format!(
                "is {} bytes; use at least {MIN_LEN}, e.g. `openssl rand -hex 32`",
                t.len()
            )));
        }
        if !t.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid(
                "must be printable ASCII without spaces (it travels in an HTTP header)",
            ));
        }
        Ok(Self {
            header: format!("Bearer {t}").into(),
        })
    }

    /// Reads a token file (its whole content, trimmed; at most 4 KiB).
    pub fn from_file(path: &Path) -> Result<Self, TokenError> {
        use std::io::Read;
        let read = |source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(read)?
            .take(MAX_FILE_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        if text.len() as u64 > MAX_FILE_BYTES {
            return Err(TokenError::Invalid {
                origin: path.display().to_string(),
                why: format!("is a file of more than {MAX_FILE_BYTES} bytes; a token is one line"),
            });
        }
        Self::new(&text, &path.display().to_string())
    }

    /// The token in force: from `file` if given, else from `$L2L_TOKEN`, else none.
    pub fn resolve(file: Option<&Path>) -> Result<Option<Self>, TokenError> {
        let env = std::env::var(TOKEN_ENV).ok().filter(|v| !v.is_empty());
        match (file, env) {
            (Some(_), Some(_)) => Err(TokenError::Both),
            (Some(path), None) => Self::from_file(path).map(Some),
            (None, Some(text)) => Self::new(&text, &format!("${TOKEN_ENV}")).map(Some),
            (None, None) => Ok(None),
        }
    }

    /// Adds the token to a request's metadata.
    pub fn attach(&self, metadata: &mut MetadataMap) {
        // Checked printable ASCII in `new`, so this parse cannot fail.
        if let Ok(v) = AsciiMetadataValue::try_from(&*self.header) {
            metadata.insert(HEADER, v);
        }
    }

    /// Whether `metadata` carries this token; compares in time independent of where
    /// the bytes differ (only the length can be learnt from timing).
    pub fn accepts(&self, metadata: &MetadataMap) -> bool {
        let Some(got) = metadata.get(HEADER) else {
            return false;
        };
        self.accepts_header(got.as_bytes())
    }

    /// Whether an `authorization` header value is `Bearer <this token>`, compared in
    /// constant time (for HTTP endpoints beside gRPC, such as `/metrics`).
    pub fn accepts_header(&self, value: &[u8]) -> bool {
        value.ct_eq(self.header.as_bytes()).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_round_trips_through_metadata_and_refuses_others() {
        let t = Token::new("0123456789abcdef0123\n", "test").unwrap();
        let mut m = MetadataMap::new();
        assert!(!t.accepts(&m), "no header");
        t.attach(&mut m);
        assert_eq!(
            m.get(HEADER).unwrap().to_str().unwrap(),
            "Bearer 0123456789abcdef0123",
            "trimmed, bearer scheme"
        );
        assert!(t.accepts(&m));
        let other = Token::new("0123456789abcdef0124", "test").unwrap();
        assert!(!other.accepts(&m), "one byte differs");
        let longer = Token::new("0123456789abcdef01234", "test").unwrap();
        assert!(!longer.accepts(&m), "a prefix is not enough");
        assert_eq!(format!("{t:?}"), "Token(<redacted>)");
    }

    #[test]
    fn unusable_tokens_are_refused_with_a_reason() {
        let e = Token::new("short", "f").unwrap_err().to_string();
        assert!(e.contains("at least 16"), "{e}");
        let e = Token::new("0123456789 abcdef", "f")
            .unwrap_err()
            .to_string();
        assert!(e.contains("printable ASCII"), "{e}");
        let e = Token::from_file(Path::new("/nonexistent/token"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/token"), "{e}");
    }
}
