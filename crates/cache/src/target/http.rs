//! A cache served over HTTP(S), read anonymously the way Nix's substituter reads it.

use std::time::Duration;

use reqwest::{Client, Response, StatusCode};

use nixpush_format::cache_keys::NIX_CACHE_INFO;

use super::{ChunkReader, ObjectReader};
use crate::{CacheError, error_chain};

pub(crate) struct HttpTarget {
    client: Client,
    base: String,
}

impl HttpTarget {
    pub fn open(base: &str) -> Result<Self, CacheError> {
        let client = Client::builder()
            .connect_timeout(Duration::from_secs(10))
            // Per read, not per request: a large NAR may take minutes, a stalled one should not.
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("nixpush/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| CacheError::Http {
                url: base.to_owned(),
                message: error_chain(&e),
            })?;
        Ok(HttpTarget {
            client,
            base: base.to_owned(),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    fn url(&self, key: &str) -> String {
        format!("{}/{key}", self.base)
    }

    /// Sends a request; `None` for 404, and for a 403 on an object (S3-backed sites answer 403 for
    /// a missing key when listing is not allowed, and Nix reads it as "not there"). A 401, or a 403
    /// on `nix-cache-info` (which every cache has), means the cache refuses us: an access error,
    /// not a missing object.
    async fn send(
        &self,
        method: reqwest::Method,
        key: &str,
    ) -> Result<Option<Response>, CacheError> {
        let url = self.url(key);
        let response = self
            .client
            .request(method, &url)
            .send()
            .await
            .map_err(|e| self.transport_error(&url, &e))?;
        match response.status() {
            s if s.is_success() => Ok(Some(response)),
            StatusCode::NOT_FOUND => Ok(None),
            StatusCode::FORBIDDEN if key != NIX_CACHE_INFO => Ok(None),
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => Err(CacheError::HttpDenied {
                url,
                status: s.as_u16(),
            }),
            s => Err(CacheError::Http {
                url,
                message: format!("HTTP {s}"),
            }),
        }
    }

    fn transport_error(&self, url: &str, e: &reqwest::Error) -> CacheError {
        if e.is_connect() || e.is_timeout() {
            CacheError::Unreachable {
                endpoint: self.base.clone(),
                message: error_chain(e),
            }
        } else {
            CacheError::Http {
                url: url.to_owned(),
                message: error_chain(e),
            }
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        Ok(self.send(reqwest::Method::HEAD, key).await?.is_some())
    }

    pub async fn size(&self, key: &str) -> Result<Option<u64>, CacheError> {
        Ok(self
            .send(reqwest::Method::HEAD, key)
            .await?
            // The header itself: reqwest's content_length() is the body's, and a HEAD has none.
            .map(|r| {
                r.headers()
                    .get(reqwest::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok()?.parse().ok())
                    .unwrap_or_default()
            }))
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        let Some(response) = self.send(reqwest::Method::GET, key).await? else {
            return Ok(None);
        };
        let body = response
            .bytes()
            .await
            .map_err(|e| self.transport_error(&self.url(key), &e))?;
        Ok(Some(body.to_vec()))
    }

    pub async fn read(&self, key: &str) -> Result<Option<ObjectReader>, CacheError> {
        let Some(mut response) = self.send(reqwest::Method::GET, key).await? else {
            return Ok(None);
        };
        let (mut tx, reader) = ChunkReader::channel();
        let url = self.url(key);
        tokio::spawn(async move {
            loop {
                match response.chunk().await {
                    Ok(Some(c)) => {
                        if !tx.push(&c).await {
                            return;
                        }
                    }
                    Ok(None) => return tx.finish().await,
                    Err(e) => return tx.fail(format!("GET {url}: {}", error_chain(&e))).await,
                }
            }
        });
        Ok(Some(ObjectReader::Stream(reader)))
    }
}
