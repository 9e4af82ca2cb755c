//! The errors of the library, each naming what was wrong and what to do.

use std::path::PathBuf;

/// Everything `l2l-common` can refuse or fail at.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A configuration value is out of range or unknown.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// What the operating system said (in the message, so not also a `source`).
        error: std::io::Error,
    },
    /// A file's content does not follow the spec's format.
    #[error("{path}: {reason}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong with it, naming the tensor or metadata field.
        reason: String,
    },
    /// Two tensors or a tensor and its expected size disagree.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A computation produced or was given a non-finite number.
    #[error("non-finite value: {0}")]
    NonFinite(String),
    /// The tensor backend failed to read a result back.
    #[error("backend: {0}")]
    Backend(String),
}

impl Error {
    /// A format error for `path`.
    pub fn format(path: impl Into<PathBuf>, reason: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            reason: reason.into(),
        }
    }
}
