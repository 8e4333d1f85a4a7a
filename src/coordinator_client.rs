//! The client side of `--coordinator URL` (`arbor search`, `arbor eval`): the URL (`http://`
//! assumed without a scheme), TLS for `https://`, and the bearer token from `ARBOR_TOKEN` on
//! every call.

use anyhow::{anyhow, bail, Result};
use arbor::rpc::pb::search_client::SearchClient;
use arbor::rpc::tls::{ClientTls, ClientTlsFiles};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

/// Adds `authorization: Bearer TOKEN` to every call when a token is set.
#[derive(Clone)]
pub(crate) struct Bearer(Option<tonic::metadata::AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(t) = &self.0 {
            req.metadata_mut().insert("authorization", t.clone());
        }
        Ok(req)
    }
}

/// A `Search` client of one coordinator.
pub(crate) type Client = SearchClient<InterceptedService<Channel, Bearer>>;

/// Connects to the coordinator at `url` with the TLS files of `--tls-ca` / `--tls-cert` /
/// `--tls-key` (given only for an `https://` URL); returns the URL as connected and the client.
pub(crate) async fn connect(url: &str, files: &ClientTlsFiles) -> Result<(String, Client)> {
    let url = if url.contains("://") {
        url.to_string()
    } else {
        format!("http://{url}")
    };
    let tls = ClientTls::load(files, "tls-").map_err(anyhow::Error::msg)?;
    if tls.is_some() && !url.starts_with("https://") {
        bail!("--tls-ca/--tls-cert need an https:// --coordinator (got {url})");
    }
    let channel = arbor::rpc::tls::connect(&url, tls.as_ref())
        .await
        .map_err(|e| {
            anyhow!(
                "--coordinator {url}: cannot connect: {}",
                arbor::rpc::tls::error_chain(&e)
            )
        })?;
    // ARBOR_TOKEN: the bearer token of a coordinator started with --auth-token-file.
    let token = match std::env::var("ARBOR_TOKEN") {
        Ok(t) if !t.trim().is_empty() => Some(
            format!("Bearer {}", t.trim())
                .parse()
                .map_err(|_| anyhow!("ARBOR_TOKEN is not printable ASCII"))?,
        ),
        _ => None,
    };
    let client = SearchClient::with_interceptor(channel, Bearer(token));
    Ok((url, client))
}
