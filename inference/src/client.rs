//! A minimal HTTP/1.1 client over one keep-alive loopback connection, for the API tests and
//! `tributary bench inference`. Not for talking to anything but this API.

use std::net::SocketAddr;

use axum::body::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;

/// Largest response body read.
pub const RESPONSE_BYTES_MAX: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {address}: {source}")]
    Connect {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("building the request: {0}")]
    Request(#[from] hyper::http::Error),
    #[error("response body: {0}")]
    Body(String),
}

/// One response, fully read.
#[derive(Clone, Debug)]
pub struct ClientResponse {
    pub status: u16,
    pub headers: hyper::HeaderMap,
    pub body: Vec<u8>,
}

impl ClientResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|value| value.to_str().ok())
    }

    /// The body as JSON of type `T`.
    pub fn json<T: serde::de::DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// One connection; requests on it go one after the other.
pub struct LoopbackClient {
    sender: SendRequest<Full<Bytes>>,
    connection: tokio::task::JoinHandle<()>,
}

impl Drop for LoopbackClient {
    fn drop(&mut self) {
        self.connection.abort();
    }
}

impl LoopbackClient {
    pub async fn connect(address: SocketAddr) -> Result<LoopbackClient, ClientError> {
        let stream = tokio::net::TcpStream::connect(address)
            .await
            .map_err(|source| ClientError::Connect { address, source })?;
        stream.set_nodelay(true).map_err(|source| ClientError::Connect { address, source })?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        let connection = tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "loopback client connection ended");
            }
        });
        Ok(LoopbackClient { sender, connection })
    }

    /// Sends one request and reads the whole response.
    pub async fn send(
        &mut self,
        method: &str,
        path_and_query: &str,
        headers: &[(&str, &str)],
        body: Vec<u8>,
    ) -> Result<ClientResponse, ClientError> {
        let mut builder =
            hyper::Request::builder().method(method).uri(path_and_query).header("host", "localhost");
        for (name, value) in headers {
            builder = builder.header(*name, *value);
        }
        let request = builder.body(Full::new(Bytes::from(body)))?;
        self.sender.ready().await?;
        let response = self.sender.send_request(request).await?;
        let (parts, body) = response.into_parts();
        let body = http_body_util::Limited::new(body, RESPONSE_BYTES_MAX)
            .collect()
            .await
            .map_err(|error| ClientError::Body(error.to_string()))?
            .to_bytes()
            .to_vec();
        Ok(ClientResponse { status: parts.status.as_u16(), headers: parts.headers, body })
    }

    /// `POST /v1/infer[?model=]` with `body` of `content_type`.
    pub async fn infer(
        &mut self,
        model: Option<&str>,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<ClientResponse, ClientError> {
        let path = match model {
            Some(model) => format!("/v1/infer?model={model}"),
            None => "/v1/infer".to_string(),
        };
        self.send("POST", &path, &[("content-type", content_type)], body).await
    }
}
