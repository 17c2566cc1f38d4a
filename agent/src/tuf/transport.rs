//! tough's [`Transport`] over the agent's own HTTP client (the one bundles are downloaded with),
//! so the agent links one HTTP stack and one TLS library. `file://` URLs read local files (a
//! repository on removable media, the tests).

use futures_util::StreamExt;
use std::pin::Pin;
use tough::async_trait;
use tough::{FilesystemTransport, Transport, TransportError, TransportErrorKind};

/// What [`Transport::fetch`] returns (tough 0.18 does not export its alias).
type TransportStream = Pin<Box<dyn futures_util::Stream<Item = Result<bytes::Bytes, TransportError>> + Send>>;
use url::Url;

/// Fetches metadata files with `reqwest` (http, https) or from the filesystem (file).
#[derive(Debug, Clone)]
pub struct AgentTransport {
    client: reqwest::Client,
}

impl AgentTransport {
    /// A transport over `client`.
    pub fn new(client: reqwest::Client) -> Self {
        Self { client }
    }
}

#[async_trait]
impl Transport for AgentTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        match url.scheme() {
            "file" => FilesystemTransport.fetch(url).await,
            "http" | "https" => {
                let response = self
                    .client
                    .get(url.clone())
                    .send()
                    .await
                    .map_err(|e| TransportError::new_with_cause(TransportErrorKind::Other, &url, e))?;
                let status = response.status();
                if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::GONE {
                    return Err(TransportError::new(TransportErrorKind::FileNotFound, &url));
                }
                if !status.is_success() {
                    return Err(TransportError::new_with_cause(
                        TransportErrorKind::Other,
                        &url,
                        format!("HTTP status {status}"),
                    ));
                }
                let for_errors = url.clone();
                let stream = response.bytes_stream().map(move |chunk| {
                    chunk.map_err(|e| {
                        TransportError::new_with_cause(TransportErrorKind::Other, &for_errors, e)
                    })
                });
                Ok(Box::pin(stream))
            }
            _ => Err(TransportError::new(
                TransportErrorKind::UnsupportedUrlScheme,
                &url,
            )),
        }
    }
}
