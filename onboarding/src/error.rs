//! Errors of the onboarding crate, each naming what it concerns and what to do next.

use std::path::PathBuf;

use crate::RejectionCode;

#[derive(Debug, thiserror::Error)]
pub enum OnboardingError {
    #[error(transparent)]
    Fleet(#[from] fleet::FleetError),

    /// The authority's device registry (`onboarding-authority`, LMDB through heed) failed.
    #[error("registry at {path}: {operation}: {source}")]
    Registry {
        path: PathBuf,
        operation: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("{path}: {problem}")]
    File { path: PathBuf, problem: String },

    #[error("MQTT: {0}")]
    Mqtt(String),

    #[error("invalid onboarding config: {0}")]
    Config(String),

    #[error("onboarding refused by the authority: {code}: {message}")]
    Rejected { code: RejectionCode, message: String },

    #[error(
        "no answer from the onboarding authority after {attempts} attempts of {timeout_ms} ms \
         (is the broker reachable and the authority running?)"
    )]
    NoAnswer { attempts: u32, timeout_ms: u64 },

    #[error("the authority's answer is not usable: {0}")]
    BadAnswer(String),

    #[error(
        "the authority's answer offers fleet CAs sha256 {offered_sha256}, but this device pins sha256 \
         {pinned_sha256} and none of its pinned CAs vouches for the others: answer refused (is the \
         device image built for this fleet?)"
    )]
    CaMismatch { pinned_sha256: String, offered_sha256: String },

    #[error("device {device_id} is {state}, not active (only an onboarded device takes config)")]
    NotActive { device_id: String, state: &'static str },

    #[error("device {device_id} is not in the registry")]
    UnknownDevice { device_id: String },

    #[error("invalid claim token request: {0}")]
    Token(String),
}

impl OnboardingError {
    /// A file operation that failed: `failed to <operation> <path>: <why>`, the same error
    /// (`FleetError::Io`) as the fleet crate's own files give.
    pub fn io(operation: &'static str, path: &std::path::Path, source: std::io::Error) -> Self {
        OnboardingError::Fleet(fleet::FleetError::Io { operation, path: path.to_path_buf(), source })
    }
}
