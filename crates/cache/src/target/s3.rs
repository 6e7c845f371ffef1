//! A cache in an S3 bucket, through aws-sdk-s3 with the standard AWS credential chain.

use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{
    BehaviorVersion, ProvideCredentials, Region, RequestChecksumCalculation,
    ResponseChecksumValidation,
};
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::{ByteStream, Length};
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart, StorageClass};
use tokio::task::JoinSet;

use aws_runtime::auth::PayloadSigningOverride;
use aws_smithy_runtime_api::box_error::BoxError;
use aws_smithy_runtime_api::client::interceptors::Intercept;
use aws_smithy_runtime_api::client::interceptors::context::{
    BeforeTransmitInterceptorContextMut, FinalizerInterceptorContextRef,
};
use aws_smithy_runtime_api::client::runtime_components::RuntimeComponents;
use aws_smithy_types::config_bag::ConfigBag;
use nixpush_format::Sha256;

use super::{
    ChunkReader, Conditional, Expect, IncompleteUpload, ObjectEntry, ObjectReader, PieceDigest,
    RequestObserver, content_md5, spool_digests,
};
use crate::probe::Page;
use crate::url::AddressingStyle;
use crate::{CacheError, StoreUrl};

/// Parts uploaded at once for one object. Each streams from the spool file, so memory stays small;
/// the bound keeps one huge NAR from taking every connection.
const PARTS_IN_FLIGHT: usize = 4;

/// A server that does not accept a connection in this long is unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Deadline of one attempt at a request whose body is small (HEAD, the head of a GET, narinfos,
/// multipart calls): a server that has not answered by then has stalled, and the SDK's retry sends
/// the request again on another connection. Without it, one stalled connection froze a push for
/// good.
const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Completing a multipart upload can take AWS minutes for a large object.
const COMPLETE_DEADLINE: Duration = Duration::from_secs(600);
/// The slowest upload that still counts as progress, for sizing an upload's deadline to its body
/// (the SDK's deadline covers sending the body and waiting for the answer alike): a 5 MiB part gets
/// 50 s, a 1 GiB object 68 minutes.
const SLOWEST_UPLOAD_BYTES_PER_SEC: u64 = 256 * 1024;

/// The pauses before each new DeleteObjects request for the keys the last one failed with a
/// transient error: 7.5 s in all, well inside a collection's lease.
const DELETE_RETRY_PAUSES: [Duration; 4] = [
    Duration::from_millis(500),
    Duration::from_secs(1),
    Duration::from_secs(2),
    Duration::from_secs(4),
];

/// One key a DeleteObjects request did not delete, as its answer says.
struct KeyFailure {
    key: String,
    code: Option<String>,
    message: String,
}

/// Whether a key that DeleteObjects failed with `code` may be deleted by asking again: the server
/// was busy, not refusing.
fn key_failure_is_transient(code: Option<&str>) -> bool {
    matches!(
        code,
        Some("InternalError" | "ServiceUnavailable" | "SlowDown" | "RequestTimeout")
    )
}

/// The deadline of one attempt at uploading `len` bytes.
fn upload_deadline(len: u64) -> Duration {
    REQUEST_DEADLINE + Duration::from_secs(len / SLOWEST_UPLOAD_BYTES_PER_SEC)
}

/// Timeouts for one attempt; the connect timeout is repeated because an override replaces the
/// client's whole timeout configuration.
fn attempt_timeouts(deadline: Duration) -> aws_sdk_s3::config::timeout::TimeoutConfig {
    aws_sdk_s3::config::timeout::TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(deadline)
        .build()
}

/// A per-request override of the attempt deadline.
fn deadline(d: Duration) -> aws_sdk_s3::config::Builder {
    aws_sdk_s3::config::Builder::default().timeout_config(attempt_timeouts(d))
}

pub(crate) struct S3Target {
    /// Where in-progress multipart uploads are recorded, so that a restarted daemon aborts the ones
    /// a crash left behind, and only those (other builders may be uploading to the same bucket).
    journal: Option<PathBuf>,
    client: Client,
    bucket: String,
    endpoint: String,
    storage_class: Option<StorageClass>,
    url: StoreUrl,
}

type HttpResponse = aws_sdk_s3::config::http::HttpResponse;

/// A part failed either reading the spool file or in the request; the latter is classified by the
/// target, which knows the bucket and endpoint.
enum PartError {
    Local(CacheError),
    Sdk(Box<SdkError<aws_sdk_s3::operation::upload_part::UploadPartError, HttpResponse>>),
}

impl S3Target {
    pub async fn open(
        url: &StoreUrl,
        bucket: &str,
        journal: Option<&Path>,
        observer: Option<RequestObserver>,
    ) -> Result<Self, CacheError> {
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(url.region.clone()))
            .timeout_config(attempt_timeouts(REQUEST_DEADLINE));
        if let Some(p) = &url.profile {
            loader = loader.profile_name(p);
        }
        let sdk = loader.load().await;
        // Resolve credentials now: "no credentials" is a different problem from "wrong credentials",
        // and each deserves its own message before any work starts.
        let provider = sdk
            .credentials_provider()
            .ok_or_else(|| CacheError::NoCredentials {
                message: "no credential provider".into(),
            })?;
        provider
            .provide_credentials()
            .await
            .map_err(|e| CacheError::NoCredentials {
                message: DisplayErrorContext(&e).to_string(),
            })?;

        let endpoint = url.endpoint.as_ref().map(|e| {
            if e.contains("://") {
                e.clone()
            } else {
                format!("{}://{e}", url.scheme)
            }
        });
        let path_style = match url.addressing_style {
            AddressingStyle::Path => true,
            AddressingStyle::Virtual => false,
            AddressingStyle::Auto => endpoint.is_some(),
        };
        let mut config = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(path_style)
            // S3-compatible servers (Garage, MinIO, s3s, Ceph) vary in their support of the newer
            // flexible checksums; send them only where S3 requires them.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(e) = &endpoint {
            config = config.endpoint_url(e);
        }
        if let Some(observer) = observer {
            config = config.interceptor(CountRequests(observer));
        }
        let target = S3Target {
            journal: journal.map(Path::to_owned),
            client: Client::from_conf(config.build()),
            bucket: bucket.to_owned(),
            endpoint: endpoint.unwrap_or_else(|| format!("s3.{}.amazonaws.com", url.region)),
            storage_class: url.storage_class.as_deref().map(StorageClass::from),
            url: url.clone(),
        };
        Ok(target)
    }

    /// Turns "nothing works" into one precise message at start-up (unreachable, denied, no bucket,
    /// wrong region).
    pub(crate) async fn check_bucket(&self) -> Result<(), CacheError> {
        let e = match self.client.head_bucket().bucket(&self.bucket).send().await {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        let status = e.raw_response().map(|r| r.status().as_u16());
        // A bucket in another region: AWS answers 301 or 400 and names the region in a header;
        // Garage answers a bare 400 (a HEAD has no body), and names it only in a GET's error.
        if matches!(status, Some(301 | 400)) {
            let named = e.raw_response().and_then(|r| {
                region_named(
                    r.headers().get("x-amz-bucket-region"),
                    r.body().bytes().unwrap_or_default(),
                )
            });
            let actual = match named {
                Some(region) => Some(region),
                None => self.location().await,
            };
            if let Some(actual) = actual.filter(|a| *a != self.url.region) {
                return Err(CacheError::WrongRegion {
                    bucket: self.bucket.clone(),
                    configured: self.url.region.clone(),
                    actual,
                });
            }
            // Only as the reason for a refusal: old us-east-1 buckets, and some servers, take
            // names that today's rules do not.
            if let Some(rule) = bucket_name_problem(&self.bucket) {
                return Err(CacheError::BadBucketName {
                    bucket: self.bucket.clone(),
                    rule,
                });
            }
        }
        Err(match self.classify(e, "HeadBucket", &self.bucket) {
            CacheError::S3 {
                status: Some(404), ..
            } => CacheError::NoSuchBucket {
                bucket: self.bucket.clone(),
                endpoint: self.endpoint.clone(),
            },
            other => other,
        })
    }

    /// The bucket's region as GetBucketLocation gives it, or as its error names it; `None` when
    /// neither says (a key without `s3:GetBucketLocation`, say).
    async fn location(&self) -> Option<String> {
        match self
            .client
            .get_bucket_location()
            .bucket(&self.bucket)
            .send()
            .await
        {
            Ok(out) => Some(location_region(
                out.location_constraint().map(|c| c.as_str()),
            )),
            Err(e) => e
                .raw_response()
                .and_then(|r| region_named(None, r.body().bytes().unwrap_or_default())),
        }
    }

    fn classify<E>(
        &self,
        e: SdkError<E, HttpResponse>,
        operation: &'static str,
        key: &str,
    ) -> CacheError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        if matches!(e, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)) {
            let message = DisplayErrorContext(&e).to_string();
            return CacheError::Unreachable {
                endpoint: self.endpoint.clone(),
                message,
            };
        }
        let status = e.raw_response().map(|r| r.status().as_u16());
        let code = e.code().map(str::to_owned);
        // The server's own words when it sent any (HEAD responses have no body), else the status.
        let message = match (&e, code.as_deref(), e.message()) {
            (SdkError::ServiceError(_), Some(c), Some(m)) => format!("{c}: {m}"),
            (SdkError::ServiceError(_), Some(c), None) => c.to_owned(),
            (SdkError::ServiceError(_), None, _) => String::new(),
            _ => DisplayErrorContext(&e).to_string(),
        };
        let retry_after = e
            .raw_response()
            .and_then(|r| r.headers().get("retry-after"))
            .and_then(|v| v.trim().parse().ok());
        match (status, code.as_deref()) {
            (_, Some("NoSuchBucket")) => CacheError::NoSuchBucket {
                bucket: self.bucket.clone(),
                endpoint: self.endpoint.clone(),
            },
            (Some(403), c)
            | (_, c @ Some("InvalidAccessKeyId" | "SignatureDoesNotMatch" | "AccessDenied")) => {
                CacheError::AccessDenied {
                    bucket: self.bucket.clone(),
                    code: c.map_or_else(|| "HTTP 403".to_owned(), str::to_owned),
                }
            }
            (Some(503), c) | (_, c @ Some("SlowDown")) => CacheError::Throttled {
                key: key.to_owned(),
                code: c.unwrap_or("HTTP 503").to_owned(),
                retry_after,
            },
            _ => CacheError::S3 {
                operation,
                key: key.to_owned(),
                message,
                status,
            },
        }
    }

    pub async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        Ok(self.size(key).await?.is_some())
    }

    pub async fn size(&self, key: &str) -> Result<Option<u64>, CacheError> {
        Ok(self.head(key).await?.map(|e| e.size))
    }

    pub async fn head(&self, key: &str) -> Result<Option<ObjectEntry>, CacheError> {
        match self
            .client
            .head_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(ObjectEntry {
                key: key.to_owned(),
                size: out.content_length().unwrap_or_default().max(0) as u64,
                modified: out.last_modified().and_then(|t| (*t).try_into().ok()),
                etag: out.e_tag().map(str::to_owned),
            })),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(e) => Err(self.classify(e, "HEAD", key)),
        }
    }

    /// Deletes up to 1,000 keys in one request (DeleteObjects, quiet: only failures come back).
    /// The SDK sends a CRC32 checksum; S3's own API and many servers (MinIO, Ceph, OVH) demand
    /// Content-MD5 of the body, so it is added before the request is signed.
    ///
    /// The request can succeed while some of its keys fail: S3 answers `InternalError` or
    /// `SlowDown` for a key under load, Garage `ServiceUnavailable` when its database is busy. The
    /// SDK retries only whole requests, so the keys that failed that way are sent again here, after
    /// a growing pause ([`DELETE_RETRY_PAUSES`]); any other failure of a key is final.
    pub async fn delete_many(&self, keys: &[String]) -> Result<(), CacheError> {
        let mut pauses = DELETE_RETRY_PAUSES.iter();
        let mut left = keys.to_vec();
        loop {
            let failed = self.delete_once(&left).await?;
            let Some(first) = failed.first() else {
                return Ok(());
            };
            // The error names a key that failed for good if there is one.
            let permanent = failed
                .iter()
                .find(|f| f.key.is_empty() || !key_failure_is_transient(f.code.as_deref()));
            let pause = pauses.next().filter(|_| permanent.is_none());
            let Some(pause) = pause else {
                let named = permanent.unwrap_or(first);
                let message = format!(
                    "{}: {}{}",
                    named.code.as_deref().unwrap_or("error"),
                    named.message,
                    match failed.len() {
                        1 => String::new(),
                        n => format!(" (and {} more keys failed)", n - 1),
                    }
                );
                return Err(CacheError::S3 {
                    operation: "DeleteObjects",
                    key: named.key.clone(),
                    message,
                    status: None,
                });
            };
            tracing::debug!(
                keys = failed.len(),
                code = first.code.as_deref().unwrap_or_default(),
                "DeleteObjects failed some keys; sending them again"
            );
            tokio::time::sleep(*pause).await;
            left = failed.into_iter().map(|f| f.key).collect();
        }
    }

    /// One DeleteObjects request; the keys it failed.
    async fn delete_once(&self, keys: &[String]) -> Result<Vec<KeyFailure>, CacheError> {
        use aws_sdk_s3::types::{Delete, ObjectIdentifier};
        let first = keys.first().cloned().unwrap_or_default();
        let built = |e: aws_sdk_s3::error::BuildError| CacheError::S3 {
            operation: "DeleteObjects",
            key: first.clone(),
            message: e.to_string(),
            status: None,
        };
        let objects = keys
            .iter()
            .map(|k| ObjectIdentifier::builder().key(k).build())
            .collect::<Result<Vec<_>, _>>()
            .map_err(built)?;
        let delete = Delete::builder()
            .set_objects(Some(objects))
            .quiet(true)
            .build()
            .map_err(built)?;
        let out = self
            .client
            .delete_objects()
            .bucket(&self.bucket)
            .delete(delete)
            .customize()
            .mutate_request(|request| {
                if let Some(md5) = request.body().bytes().map(content_md5) {
                    request.headers_mut().insert("content-md5", md5);
                }
            })
            .send()
            .await
            .map_err(|e| self.classify(e, "DeleteObjects", &first))?;
        Ok(out
            .errors()
            .iter()
            .map(|e| KeyFailure {
                key: e.key().unwrap_or_default().to_owned(),
                code: e.code().map(str::to_owned),
                message: e.message().unwrap_or_default().to_owned(),
            })
            .collect())
    }

    /// The bucket's versioning status (`Enabled`, `Suspended`), `None` if it was never enabled.
    pub async fn versioning(&self) -> Result<Option<String>, CacheError> {
        let out = self
            .client
            .get_bucket_versioning()
            .bucket(&self.bucket)
            .send()
            .await
            .map_err(|e| self.classify(e, "GetBucketVersioning", &self.bucket))?;
        Ok(out.status().map(|s| s.as_str().to_owned()))
    }

    pub async fn delete(&self, key: &str) -> Result<(), CacheError> {
        match self
            .client
            .delete_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(()),
            Err(e) => Err(self.classify(e, "DELETE", key)),
        }
    }

    pub async fn put_if(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
        expect: &Expect,
    ) -> Result<Conditional, CacheError> {
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .content_md5(content_md5(&body))
            .body(ByteStream::from(body));
        let request = match expect {
            Expect::Absent => request.if_none_match("*"),
            Expect::Etag(etag) => request.if_match(etag),
        };
        match request.send().await {
            Ok(out) => Ok(Conditional::Written(out.e_tag().map(str::to_owned))),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 412) => {
                Ok(Conditional::Refused)
            }
            Err(e) => Err(self.classify(e, "PUT", key)),
        }
    }

    /// GET, with `None` for a missing object.
    async fn get_object(
        &self,
        key: &str,
    ) -> Result<Option<aws_sdk_s3::operation::get_object::GetObjectOutput>, CacheError> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(out) => Ok(Some(out)),
            Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => Ok(None),
            Err(e) => Err(self.classify(e, "GET", key)),
        }
    }

    pub async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, CacheError> {
        Ok(self.get_dated(key).await?.map(|(body, _)| body))
    }

    /// The object's body, and when it was written (by the server's clock).
    pub async fn get_dated(
        &self,
        key: &str,
    ) -> Result<Option<(Vec<u8>, Option<std::time::SystemTime>)>, CacheError> {
        let Some(out) = self.get_object(key).await? else {
            return Ok(None);
        };
        let modified = out.last_modified().and_then(|t| (*t).try_into().ok());
        let body = out.body.collect().await.map_err(|e| CacheError::S3 {
            operation: "GET",
            key: key.to_owned(),
            message: e.to_string(),
            status: None,
        })?;
        Ok(Some((body.to_vec(), modified)))
    }

    /// Streams the object's body through a bounded channel, so a slow reader holds back the
    /// download instead of buffering it.
    pub async fn read(&self, key: &str) -> Result<Option<ObjectReader>, CacheError> {
        let Some(out) = self.get_object(key).await? else {
            return Ok(None);
        };
        let (mut tx, reader) = ChunkReader::channel();
        let mut body = out.body;
        let key = key.to_owned();
        tokio::spawn(async move {
            while let Some(chunk) = body.next().await {
                match chunk {
                    Ok(c) => {
                        if !tx.push(&c).await {
                            return;
                        }
                    }
                    Err(e) => {
                        return tx
                            .fail(format!("GET {key}: {}", DisplayErrorContext(&e)))
                            .await;
                    }
                }
            }
            tx.finish().await
        });
        Ok(Some(ObjectReader::Stream(reader)))
    }

    pub async fn list(&self) -> Result<Vec<ObjectEntry>, CacheError> {
        self.list_prefix("", false).await
    }

    pub async fn list_prefix(
        &self,
        prefix: &str,
        shallow: bool,
    ) -> Result<Vec<ObjectEntry>, CacheError> {
        let mut out = Vec::new();
        let mut pages = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .prefix(prefix)
            .set_delimiter(shallow.then(|| "/".to_owned()))
            .into_paginator()
            .send();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.classify(e, "ListObjectsV2", &self.bucket))?;
            for o in page.contents() {
                if let Some(key) = o.key() {
                    out.push(ObjectEntry {
                        key: key.to_owned(),
                        size: o.size().unwrap_or_default().max(0) as u64,
                        modified: o.last_modified().and_then(|t| (*t).try_into().ok()),
                        etag: o.e_tag().map(str::to_owned),
                    });
                }
            }
        }
        Ok(out)
    }

    /// One page of the listing after `start_after`, keys below a `/` summed up by their prefix.
    pub(crate) async fn list_page(&self, start_after: &str) -> Result<Page, CacheError> {
        let page = self
            .client
            .list_objects_v2()
            .bucket(&self.bucket)
            .start_after(start_after)
            .delimiter("/")
            .send()
            .await
            .map_err(|e| self.classify(e, "ListObjectsV2", &self.bucket))?;
        let keys: Vec<String> = page
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_owned))
            .collect();
        // A page's entries are its keys and its prefixes, interleaved in order.
        let last = keys
            .last()
            .map(String::as_str)
            .into_iter()
            .chain(page.common_prefixes().iter().filter_map(|p| p.prefix()))
            .max()
            .map(str::to_owned);
        Ok(Page {
            keys,
            last,
            truncated: page.is_truncated().unwrap_or(false),
        })
    }

    pub async fn incomplete_uploads(&self) -> Result<Vec<IncompleteUpload>, CacheError> {
        let mut out = Vec::new();
        let (mut key_marker, mut id_marker) = (None::<String>, None::<String>);
        loop {
            let page = self
                .client
                .list_multipart_uploads()
                .bucket(&self.bucket)
                .set_key_marker(key_marker.take())
                .set_upload_id_marker(id_marker.take())
                .send()
                .await
                .map_err(|e| self.classify(e, "ListMultipartUploads", &self.bucket))?;
            for u in page.uploads() {
                let started = u
                    .initiated()
                    .map(|t| format!(", started {t}"))
                    .unwrap_or_default();
                out.push(IncompleteUpload {
                    key: u.key().unwrap_or_default().to_owned(),
                    detail: format!(
                        "multipart upload {}{started}",
                        u.upload_id().unwrap_or_default()
                    ),
                });
            }
            if !page.is_truncated().unwrap_or(false) {
                return Ok(out);
            }
            key_marker = page.next_key_marker().map(str::to_owned);
            id_marker = page.next_upload_id_marker().map(str::to_owned);
            if key_marker.is_none() && id_marker.is_none() {
                return Ok(out);
            }
        }
    }

    pub async fn put_bytes(
        &self,
        key: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> Result<(), CacheError> {
        let len = body.len() as u64;
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .content_md5(content_md5(&body))
            .set_storage_class(self.storage_class.clone())
            .body(ByteStream::from(body));
        // An override costs every request a merge of the client's configuration: for the small
        // objects that most uploads are, whose deadline is the client's own, it is left out.
        let sent = if upload_deadline(len) == REQUEST_DEADLINE {
            request.send().await
        } else {
            request
                .customize()
                .config_override(deadline(upload_deadline(len)))
                .send()
                .await
        };
        sent.map_err(|e| self.classify(e, "PUT", key))?;
        Ok(())
    }

    pub async fn put_file(
        &self,
        key: &str,
        path: &Path,
        len: u64,
        hash: Sha256,
        content_type: &str,
    ) -> Result<(), CacheError> {
        let multipart = self.url.use_multipart(len);
        let piece = if multipart {
            self.url.part_size(len)
        } else {
            len
        };
        let spool = path.to_owned();
        let md5s = tokio::task::spawn_blocking(move || spool_digests(&spool, len, hash, piece))
            .await
            .expect("spool hashing panicked")?;
        if !multipart {
            let body = file_body(path, 0, len, key).await?;
            self.client
                .put_object()
                .bucket(&self.bucket)
                .key(key)
                .content_type(content_type)
                .content_md5(&md5s[0].md5)
                .content_length(len as i64)
                .set_storage_class(self.storage_class.clone())
                .body(body)
                .customize()
                .config_override(deadline(upload_deadline(len)))
                .interceptor(SignedPayloadHash(md5s[0].sha256.clone()))
                .send()
                .await
                .map_err(|e| self.classify(e, "PUT", key))?;
            return Ok(());
        }
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .content_type(content_type)
            .set_storage_class(self.storage_class.clone())
            .send()
            .await
            .map_err(|e| self.classify(e, "CreateMultipartUpload", key))?;
        let upload_id = created.upload_id().unwrap_or_default().to_owned();
        let entry = self
            .journal
            .as_ref()
            .map(|dir| dir.join(journal_name(&upload_id)));
        if let Some(entry) = &entry {
            let recorded = std::fs::create_dir_all(self.journal.as_ref().expect("set"))
                .and_then(|()| std::fs::write(entry, format!("{key}\n{upload_id}\n")));
            if let Err(e) = recorded {
                tracing::warn!(error = %e, "cannot record the multipart upload; a crash would leave it behind");
            }
        }
        let result = self.upload_parts(key, path, len, &md5s, &upload_id).await;
        if result.is_err() {
            // An incomplete upload is invisible but billed; never leave one behind.
            if let Err(e) = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await
            {
                tracing::warn!(key, error = %DisplayErrorContext(&e), "could not abort multipart upload");
                return result;
            }
        }
        if let Some(entry) = entry {
            let _ = std::fs::remove_file(entry);
        }
        result
    }

    /// Aborts the multipart uploads recorded in the journal (left by a crash). Returns how many.
    pub async fn abort_journaled(&self) -> Result<usize, CacheError> {
        let Some(dir) = &self.journal else {
            return Ok(0);
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(CacheError::File {
                    operation: "reading",
                    path: dir.clone(),
                    source,
                });
            }
        };
        let mut aborted = 0;
        for entry in entries.flatten() {
            let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
            let mut lines = text.lines();
            if let (Some(key), Some(upload_id)) = (lines.next(), lines.next()) {
                match self
                    .client
                    .abort_multipart_upload()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .send()
                    .await
                {
                    Ok(_) => aborted += 1,
                    // Already completed or aborted: nothing left to clean.
                    Err(e) if e.raw_response().is_some_and(|r| r.status().as_u16() == 404) => {}
                    Err(e) => return Err(self.classify(e, "AbortMultipartUpload", key)),
                }
            }
            let _ = std::fs::remove_file(entry.path());
        }
        Ok(aborted)
    }

    async fn upload_parts(
        &self,
        key: &str,
        path: &Path,
        len: u64,
        md5s: &[PieceDigest],
        upload_id: &str,
    ) -> Result<(), CacheError> {
        let part_size = self.url.part_size(len);
        let count = len.div_ceil(part_size);
        tracing::debug!(key, parts = count, part_size, "multipart upload");
        let mut in_flight = JoinSet::new();
        let mut done = Vec::with_capacity(count as usize);
        let mut next = 0u64;
        while next < count || !in_flight.is_empty() {
            while next < count && in_flight.len() < PARTS_IN_FLIGHT {
                let offset = next * part_size;
                let size = part_size.min(len - offset);
                let number = (next + 1) as i32;
                let request = self
                    .client
                    .upload_part()
                    .bucket(&self.bucket)
                    .key(key)
                    .upload_id(upload_id)
                    .part_number(number)
                    .content_md5(&md5s[next as usize].md5)
                    .content_length(size as i64);
                let (path, key) = (path.to_owned(), key.to_owned());
                let sha256 = md5s[next as usize].sha256.clone();
                in_flight.spawn(async move {
                    let body = file_body(&path, offset, size, &key)
                        .await
                        .map_err(PartError::Local)?;
                    let out = request
                        .body(body)
                        .customize()
                        .config_override(deadline(upload_deadline(size)))
                        .interceptor(SignedPayloadHash(sha256))
                        .send()
                        .await
                        .map_err(|e| PartError::Sdk(Box::new(e)))?;
                    Ok::<_, PartError>((number, out.e_tag().map(str::to_owned)))
                });
                next += 1;
            }
            if let Some(joined) = in_flight.join_next().await {
                let (number, etag) =
                    joined
                        .expect("part upload task panicked")
                        .map_err(|e| match e {
                            PartError::Local(e) => e,
                            PartError::Sdk(e) => self.classify(*e, "UploadPart", key),
                        })?;
                done.push(
                    CompletedPart::builder()
                        .part_number(number)
                        .set_e_tag(etag)
                        .build(),
                );
            }
        }
        done.sort_by_key(|p| p.part_number());
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(done))
                    .build(),
            )
            .customize()
            .config_override(deadline(COMPLETE_DEADLINE))
            .send()
            .await
            .map_err(|e| self.classify(e, "CompleteMultipartUpload", key))?;
        Ok(())
    }
}

/// Hands the signer the SHA-256 of a body read from the spool file, computed while the file was
/// checked (see `spool_digests`). Without it the SDK reads the file once more to compute the hash
/// it signs; without a signed hash at all, servers that ignore `Content-MD5` (s3s) would store a
/// body changed on the way.
#[derive(Debug)]
struct SignedPayloadHash(String);

impl Intercept for SignedPayloadHash {
    fn name(&self) -> &'static str {
        "SignedPayloadHash"
    }

    fn modify_before_signing(
        &self,
        _: &mut BeforeTransmitInterceptorContextMut<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        cfg.interceptor_state()
            .store_put(PayloadSigningOverride::Precomputed(self.0.clone()));
        Ok(())
    }
}

/// Tells a [`RequestObserver`] of every attempt, retries included.
struct CountRequests(RequestObserver);

impl std::fmt::Debug for CountRequests {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CountRequests")
    }
}

impl Intercept for CountRequests {
    fn name(&self) -> &'static str {
        "CountRequests"
    }

    fn read_after_attempt(
        &self,
        context: &FinalizerInterceptorContextRef<'_>,
        _: &RuntimeComponents,
        cfg: &mut ConfigBag,
    ) -> Result<(), BoxError> {
        let operation = cfg
            .load::<aws_smithy_runtime_api::client::orchestrator::Metadata>()
            .map_or("unknown", |m| m.name());
        let outcome = match context.response().map(|r| r.status().as_u16() / 100) {
            Some(2) => "2xx",
            Some(3) => "3xx",
            Some(4) => "4xx",
            Some(5) => "5xx",
            _ => "error",
        };
        (self.0)(operation, outcome);
        Ok(())
    }
}

/// Upload ids are opaque and may hold `/`; the journal's file names must not.
fn journal_name(upload_id: &str) -> String {
    hex::encode(upload_id)
}

async fn file_body(
    path: &Path,
    offset: u64,
    len: u64,
    key: &str,
) -> Result<ByteStream, CacheError> {
    ByteStream::read_from()
        .path(path)
        .offset(offset)
        .length(Length::Exact(len))
        .buffer_size(256 * 1024)
        .build()
        .await
        .map_err(|e| CacheError::S3 {
            operation: "reading spool for",
            key: key.to_owned(),
            message: e.to_string(),
            status: None,
        })
}

/// The region an answer names for the bucket: S3's `x-amz-bucket-region` header, or the `<Region>`
/// of an error body (AWS and Garage put it there when a request was signed for another region).
fn region_named(header: Option<&str>, body: &[u8]) -> Option<String> {
    let from_body = || {
        let body = std::str::from_utf8(body).ok()?;
        let start = body.find("<Region>")? + "<Region>".len();
        let len = body[start..].find("</Region>")?;
        Some(body[start..start + len].trim())
    };
    header
        .map(str::trim)
        .or_else(from_body)
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
}

/// Which of S3's bucket naming rules `name` breaks, if any.
fn bucket_name_problem(name: &str) -> Option<&'static str> {
    let allowed = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '.' || c == '-';
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !(3..=63).contains(&name.len()) {
        Some("3 to 63 characters")
    } else if !name.chars().all(allowed) {
        Some("only lowercase letters, digits, `.` and `-`")
    } else if !edge(name.chars().next()) || !edge(name.chars().last()) {
        Some("beginning and ending with a letter or digit")
    } else if name.contains("..") {
        Some("no two dots in a row")
    } else if name.parse::<std::net::Ipv4Addr>().is_ok() {
        Some("not an IP address")
    } else {
        None
    }
}

/// GetBucketLocation's `LocationConstraint` as a region: none for us-east-1, and `EU` from the
/// days before eu-west-1 had its name.
fn location_region(constraint: Option<&str>) -> String {
    match constraint {
        None | Some("") => "us-east-1",
        Some("EU") => "eu-west-1",
        Some(c) => c,
    }
    .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_are_judged_by_s3s_rules() {
        for good in ["cache", "nix-cache.example.org", "a1b", &"x".repeat(63)] {
            assert_eq!(bucket_name_problem(good), None, "{good}");
        }
        for (bad, rule) in [
            ("b1", "3 to 63"),
            (&*"x".repeat(64), "3 to 63"),
            ("Cache", "lowercase"),
            ("my_cache", "lowercase"),
            ("-cache", "beginning and ending"),
            ("cache.", "beginning and ending"),
            ("a..b", "two dots"),
            ("192.168.1.10", "IP address"),
        ] {
            let found = bucket_name_problem(bad).unwrap_or_default();
            assert!(found.contains(rule), "{bad}: {found:?}");
        }
    }

    #[test]
    fn the_region_comes_from_aws_header_or_an_error_body() {
        // AWS names it in a header on HeadBucket, whatever the status.
        assert_eq!(
            region_named(Some("eu-central-1"), b""),
            Some("eu-central-1".into())
        );
        // Garage (and AWS on a GET signed for the wrong region) in the error's <Region>.
        let garage = b"<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error>\
            <Code>AuthorizationHeaderMalformed</Code><Message>unexpected scope</Message>\
            <Resource>/cache</Resource><Region>garage</Region></Error>";
        assert_eq!(region_named(None, garage), Some("garage".into()));
        assert_eq!(
            region_named(Some("us-west-2"), garage),
            Some("us-west-2".into())
        );
        assert_eq!(
            region_named(None, b"<Error><Code>AccessDenied</Code></Error>"),
            None
        );
        assert_eq!(region_named(Some(""), b"<Region></Region>"), None);
        assert_eq!(region_named(None, &[0xff, 0xfe]), None);
    }

    #[test]
    fn key_failures_a_busy_server_gives_are_transient_and_refusals_are_not() {
        for busy in [
            "InternalError",
            "ServiceUnavailable",
            "SlowDown",
            "RequestTimeout",
        ] {
            assert!(key_failure_is_transient(Some(busy)), "{busy}");
        }
        for refused in [None, Some("AccessDenied"), Some("NoSuchBucket"), Some("")] {
            assert!(!key_failure_is_transient(refused), "{refused:?}");
        }
    }

    #[test]
    fn location_constraints_name_regions() {
        assert_eq!(location_region(None), "us-east-1");
        assert_eq!(location_region(Some("")), "us-east-1");
        assert_eq!(location_region(Some("EU")), "eu-west-1");
        assert_eq!(location_region(Some("garage")), "garage");
    }
}
