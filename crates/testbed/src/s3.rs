//! Real S3 servers for the tests, one private server per test, each with a bucket, an access key
//! that SigV4 is checked against, and an anonymous HTTP view of the bucket that Nix 2.8 (which has
//! no S3 support) substitutes from.
//!
//! | kind | server | HTTP view |
//! |---|---|---|
//! | [`S3Kind::S3sFs`] | `s3s-fs`, objects as files under `ROOT/BUCKET/KEY` | a second, anonymous `s3s-fs` over the same directory |
//! | [`S3Kind::Garage`] | Garage, single node, region `garage` | Garage's website endpoint; the bucket has the global alias `localhost`, so `http://localhost:PORT` names it by Host header on any machine |
//! | [`S3Kind::Moto`] | moto with IAM checks on, an IAM user's key | a signing gateway (below) |
//!
//! moto checks signatures only when its IAM checks are on, and then it refuses every unsigned
//! request (it fails on the missing `Authorization` header), so no bucket policy can open it to
//! anonymous readers. Its HTTP view is a small gateway here that answers GET and HEAD by signed S3
//! requests, as CloudFront with origin access control does in front of a private bucket.
//!
//! Tests read and change the bucket through [`S3Server::get`], [`S3Server::put`] and
//! [`S3Server::keys`] (S3 requests with the server's key), so they run on every kind; only s3s-fs
//! also exposes its files ([`S3Server::object`]).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation};
use aws_sdk_s3::primitives::ByteStream;
use percent_encoding::percent_decode_str;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    Guard, bind_loopback, find_program, free_port, listening_port, listening_ports, reserve_port,
    unique, wait_until,
};

/// Which S3 server a test runs against.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum S3Kind {
    S3sFs,
    Garage,
    Moto,
}

impl S3Kind {
    pub const ALL: [S3Kind; 3] = [S3Kind::S3sFs, S3Kind::Garage, S3Kind::Moto];
}

pub struct S3Server {
    pub kind: S3Kind,
    pub bucket: String,
    pub region: String,
    /// `http://127.0.0.1:PORT`, SigV4 required.
    pub endpoint: String,
    /// The anonymous view of the bucket (no trailing slash): what Nix substitutes from.
    pub http_url: String,
    pub access_key: String,
    pub secret_key: String,
    /// s3s-fs only: objects live at `ROOT/BUCKET/KEY`.
    root: Option<PathBuf>,
    /// The process behind `endpoint`; s3s-fs's can be paused.
    signed: Option<Guard>,
    signed_port: u16,
    /// Everything else that must live as long as the server: the anonymous reader.
    _others: Vec<Guard>,
    objects: BucketClient,
    /// Runs the test's own S3 requests and moto's gateway.
    runtime: Option<tokio::runtime::Runtime>,
    /// Logs and data: removed last, once the processes above are gone (fields drop in order).
    pub dir: TempDir,
}

impl S3Server {
    /// s3s-fs, the default server.
    pub fn start() -> Self {
        Self::start_kind(S3Kind::S3sFs)
    }

    pub fn start_kind(kind: S3Kind) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("nixpush-s3-")
            .tempdir()
            .unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("testbed-s3")
            .enable_all()
            .build()
            .unwrap();
        let bucket = "cache".to_owned();
        let parts = match kind {
            S3Kind::S3sFs => start_s3s_fs(dir.path(), &bucket),
            S3Kind::Garage => start_garage(dir.path(), &bucket),
            S3Kind::Moto => start_moto(dir.path(), &bucket),
        };
        let client = client(
            &parts.endpoint,
            &parts.region,
            &parts.access_key,
            &parts.secret_key,
        );
        let http_url = match parts.http_url {
            Some(url) => url,
            None => {
                let (url, gateway) = runtime.block_on(gateway(client.clone(), bucket.clone()));
                runtime.spawn(gateway);
                url
            }
        };
        let objects = BucketClient {
            client,
            name: bucket.clone(),
            runtime: runtime.handle().clone(),
        };
        S3Server {
            kind,
            dir,
            bucket,
            region: parts.region,
            signed_port: port_of(&parts.endpoint),
            endpoint: parts.endpoint,
            http_url,
            access_key: parts.access_key,
            secret_key: parts.secret_key,
            root: parts.root,
            signed: Some(parts.signed),
            _others: parts.others,
            objects,
            runtime: Some(runtime),
        }
    }

    /// s3s-fs only: the SigV4 endpoint goes down (the anonymous reader stays up);
    /// [`S3Server::resume`] brings it back on the same port.
    pub fn pause(&mut self) {
        assert_eq!(self.kind, S3Kind::S3sFs, "only s3s-fs can be paused");
        self.signed = None;
    }

    pub fn resume(&mut self) {
        let keys = (self.access_key.as_str(), self.secret_key.as_str());
        let root = self.root.clone().expect("s3s-fs");
        let (g, _) = spawn_s3s_fs(&root, self.dir.path(), Some(keys), Some(self.signed_port));
        self.signed = Some(g);
    }

    /// `s3://BUCKET?endpoint=…&region=…` plus `params` (`&`-joined, may be empty).
    pub fn store_url(&self, params: &str) -> String {
        self.store_url_at(&self.endpoint, params)
    }

    /// As [`S3Server::store_url`], through another endpoint (a relay in front of this server).
    pub fn store_url_at(&self, endpoint: &str, params: &str) -> String {
        let sep = if params.is_empty() { "" } else { "&" };
        format!(
            "s3://{}?endpoint={endpoint}&region={}{sep}{params}",
            self.bucket, self.region
        )
    }

    /// The environment that gives the AWS credential chain this server's keys, and nothing else.
    pub fn credentials_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", self.access_key.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_key.clone()),
            ("AWS_CONFIG_FILE", "/nonexistent".into()),
            ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".into()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    /// s3s-fs only: the file behind an object.
    pub fn object(&self, key: &str) -> PathBuf {
        self.bucket_dir().join(key)
    }

    /// s3s-fs only: the directory holding the bucket's objects.
    pub fn bucket_dir(&self) -> PathBuf {
        let root = self
            .root
            .as_ref()
            .unwrap_or_else(|| panic!("{:?} keeps no plain files; use get/put/keys", self.kind));
        root.join(&self.bucket)
    }

    /// Whether the anonymous HTTP view serves `key` (HTTP 200 to a HEAD), as a substituter sees it.
    pub fn served(&self, key: &str) -> bool {
        use std::io::{Read, Write};
        let rest = self.http_url.trim_start_matches("http://");
        let (host, prefix) = rest.split_once('/').map_or((rest, ""), |(h, p)| (h, p));
        let path = if prefix.is_empty() {
            format!("/{key}")
        } else {
            format!("/{prefix}/{key}")
        };
        let addr = host.replace("localhost", "127.0.0.1");
        let mut conn = std::net::TcpStream::connect(&addr).expect("the HTTP view is down");
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        write!(
            conn,
            "HEAD {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let mut status = [0u8; 12];
        conn.read_exact(&mut status)
            .expect("no answer from the HTTP view");
        &status[9..12] == b"200"
    }
}

/// S3 requests to the server's bucket with its key, for a test to read and change the bucket the
/// way any client would. Cheap to clone, so a second thread can watch the bucket while the test
/// goes on; valid while its [`S3Server`] lives.
#[derive(Clone)]
pub struct BucketClient {
    client: Client,
    name: String,
    runtime: tokio::runtime::Handle,
}

/// An [`S3Server`] is used as the client of its bucket: `s3.get(key)`, `s3.keys()`.
impl std::ops::Deref for S3Server {
    type Target = BucketClient;

    fn deref(&self) -> &BucketClient {
        &self.objects
    }
}

impl BucketClient {
    fn block_on<F: Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }

    /// Every object key in the bucket, sorted (listed by S3, page after page).
    pub fn keys(&self) -> Vec<String> {
        self.block_on(async {
            let mut keys = Vec::new();
            let mut pages = self
                .client
                .list_objects_v2()
                .bucket(&self.name)
                .into_paginator()
                .send();
            while let Some(page) = pages.next().await {
                let page = page.expect("ListObjectsV2");
                keys.extend(
                    page.contents()
                        .iter()
                        .filter_map(|o| o.key().map(str::to_owned)),
                );
            }
            keys.sort();
            keys
        })
    }

    /// An object's bytes, or `None` when it does not exist.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        self.block_on(async {
            match self
                .client
                .get_object()
                .bucket(&self.name)
                .key(key)
                .send()
                .await
            {
                Ok(o) => Some(o.body.collect().await.expect("GET body").to_vec()),
                Err(e) if not_found(e.raw_response()) => None,
                Err(e) => panic!("GET {key}: {}", aws_sdk_s3::error::DisplayErrorContext(e)),
            }
        })
    }

    pub fn exists(&self, key: &str) -> bool {
        self.block_on(async {
            match self
                .client
                .head_object()
                .bucket(&self.name)
                .key(key)
                .send()
                .await
            {
                Ok(_) => true,
                Err(e) if not_found(e.raw_response()) => false,
                Err(e) => panic!("HEAD {key}: {}", aws_sdk_s3::error::DisplayErrorContext(e)),
            }
        })
    }

    /// Writes objects, 32 at a time.
    pub fn put_all(&self, objects: Vec<(String, Vec<u8>)>) {
        self.block_on(async {
            let mut objects = objects.into_iter();
            loop {
                let batch: Vec<_> = objects.by_ref().take(32).collect();
                if batch.is_empty() {
                    return;
                }
                let mut set = tokio::task::JoinSet::new();
                for (key, bytes) in batch {
                    let put = self
                        .client
                        .put_object()
                        .bucket(&self.name)
                        .key(&key)
                        .body(ByteStream::from(bytes));
                    set.spawn(async move {
                        put.send().await.unwrap_or_else(|e| {
                            panic!("PUT {key}: {}", aws_sdk_s3::error::DisplayErrorContext(e))
                        })
                    });
                }
                set.join_all().await;
            }
        })
    }

    /// Starts a multipart upload of `key` and leaves it unfinished, as a crash would.
    pub fn start_multipart_upload(&self, key: &str) -> String {
        self.block_on(async {
            let out = self
                .client
                .create_multipart_upload()
                .bucket(&self.name)
                .key(key)
                .send()
                .await
                .expect("CreateMultipartUpload");
            out.upload_id().expect("an upload id").to_owned()
        })
    }

    /// The keys of the multipart uploads the server lists as unfinished.
    pub fn multipart_uploads(&self) -> Vec<String> {
        self.block_on(async {
            let out = self
                .client
                .list_multipart_uploads()
                .bucket(&self.name)
                .send()
                .await
                .expect("ListMultipartUploads");
            out.uploads()
                .iter()
                .filter_map(|u| u.key().map(str::to_owned))
                .collect()
        })
    }

    pub fn put(&self, key: &str, bytes: &[u8]) {
        self.put_all(vec![(key.to_owned(), bytes.to_vec())]);
    }

    pub fn delete(&self, key: &str) {
        self.block_on(async {
            self.client
                .delete_object()
                .bucket(&self.name)
                .key(key)
                .send()
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "DELETE {key}: {}",
                        aws_sdk_s3::error::DisplayErrorContext(e)
                    )
                });
        })
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

fn not_found(response: Option<&aws_sdk_s3::config::http::HttpResponse>) -> bool {
    response.is_some_and(|r| r.status().as_u16() == 404)
}

fn client(endpoint: &str, region: &str, access_key: &str, secret_key: &str) -> Client {
    let config = aws_sdk_s3::Config::builder()
        .behavior_version_latest()
        .region(Region::new(region.to_owned()))
        .endpoint_url(endpoint)
        .force_path_style(true)
        .credentials_provider(Credentials::new(
            access_key, secret_key, None, None, "testbed",
        ))
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .timeout_config(
            aws_sdk_s3::config::timeout::TimeoutConfig::builder()
                .operation_timeout(Duration::from_secs(60))
                .build(),
        )
        .build();
    Client::from_conf(config)
}

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .unwrap()
        .trim_end_matches('/')
        .parse()
        .unwrap()
}

/// What starting a server gives back.
struct Parts {
    endpoint: String,
    region: String,
    /// `None`: the server has no anonymous view; a signing gateway is put in front of it.
    http_url: Option<String>,
    access_key: String,
    secret_key: String,
    root: Option<PathBuf>,
    signed: Guard,
    others: Vec<Guard>,
}

fn start_s3s_fs(dir: &Path, bucket: &str) -> Parts {
    let root = dir.join("data");
    fs::create_dir_all(root.join(bucket)).unwrap();
    let (access_key, secret_key) = ("nixpush-test-key".to_owned(), unique("secret"));
    let (signed, signed_port) = spawn_s3s_fs(&root, dir, Some((&access_key, &secret_key)), None);
    let (anonymous, anon_port) = spawn_s3s_fs(&root, dir, None, None);
    Parts {
        endpoint: format!("http://127.0.0.1:{signed_port}"),
        region: "us-east-1".into(),
        http_url: Some(format!("http://127.0.0.1:{anon_port}/{bucket}")),
        access_key,
        secret_key,
        root: Some(root),
        signed,
        others: vec![anonymous],
    }
}

/// Starts s3s-fs on `port`, or on a port the kernel picks. Readiness and ownership are read from
/// /proc: a connect alone could reach another test's server that took the port first.
fn spawn_s3s_fs(
    root: &Path,
    dir: &Path,
    keys: Option<(&str, &str)>,
    port: Option<u16>,
) -> (Guard, u16) {
    let s3s = find_program("s3s-fs");
    for attempt in 0..10 {
        let log = dir.join(format!("s3s-{}-{attempt}.log", port.unwrap_or(0)));
        let mut cmd = Command::new(&s3s);
        cmd.args([
            "--host",
            "127.0.0.1",
            "--port",
            &port.unwrap_or(0).to_string(),
        ]);
        if let Some((ak, sk)) = keys {
            cmd.args(["--access-key", ak, "--secret-key", sk]);
        }
        cmd.arg(root).stdin(Stdio::null());
        if let Some(started) = spawn_listening(&mut cmd, "s3s-fs", &log, port.is_none()) {
            return started;
        }
    }
    panic!("s3s-fs would not start");
}

/// Spawns a server that binds one port, and waits until it listens. With `fresh_port`, a port
/// another of this process's servers holds in reserve (paused) is refused: `None`, try again.
fn spawn_listening(
    cmd: &mut Command,
    what: &str,
    log: &Path,
    fresh_port: bool,
) -> Option<(Guard, u16)> {
    // Guarded at once: a server that never gets ready is killed when the wait panics.
    let mut guard = Guard(
        cmd.stdout(fs::File::create(log).unwrap())
            .stderr(Stdio::from(
                fs::File::options().append(true).open(log).unwrap(),
            ))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}")),
    );
    let pid = guard.0.id();
    let mut bound = None;
    if !wait_until(&mut guard.0, what, log, || {
        bound = listening_port(pid);
        bound.is_some()
    }) {
        return None;
    }
    let bound = bound.expect("set by the readiness check");
    if !reserve_port(bound, fresh_port) {
        return None;
    }
    Some((guard, bound))
}

/// The bucket's global alias that Garage's website endpoint serves for `Host: localhost`: a name
/// every machine resolves, unlike the `BUCKET.web.ROOT_DOMAIN` names Garage serves by default.
const GARAGE_WEB_ALIAS: &str = "localhost";

fn start_garage(dir: &Path, bucket: &str) -> Parts {
    let garage = find_program("garage");
    for attempt in 0..5 {
        let [rpc, s3, web] = [free_port(), free_port(), free_port()];
        let config = dir.join(format!("garage-{attempt}.toml"));
        let secret: String = unique("rpc")
            .bytes()
            .chain(std::iter::repeat(b'0'))
            .take(32)
            .map(|b| format!("{b:02x}"))
            .collect();
        fs::write(
            &config,
            format!(
                "metadata_dir = \"{meta}\"\ndata_dir = \"{data}\"\ndb_engine = \"sqlite\"\n\
                 replication_factor = 1\nrpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\nrpc_secret = \"{secret}\"\n\
                 [s3_api]\ns3_region = \"garage\"\napi_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage\"\n\
                 [s3_web]\nbind_addr = \"127.0.0.1:{web}\"\nroot_domain = \".web.garage\"\n",
                meta = dir.join(format!("garage-meta-{attempt}")).display(),
                data = dir.join(format!("garage-data-{attempt}")).display(),
            ),
        )
        .unwrap();
        let log = dir.join(format!("garage-{attempt}.log"));
        // Guarded at once: a server that never gets ready is killed when the wait panics.
        let mut guard = Guard(
            Command::new(&garage)
                .arg("-c")
                .arg(&config)
                .arg("server")
                .stdin(Stdio::null())
                .stdout(fs::File::create(&log).unwrap())
                .stderr(Stdio::from(
                    fs::File::options().append(true).open(&log).unwrap(),
                ))
                .env("RUST_LOG", "garage=warn")
                .spawn()
                .expect("cannot start garage"),
        );
        let cli = |args: &[&str]| {
            Command::new(&garage)
                .arg("-c")
                .arg(&config)
                .args(args)
                .env("RUST_LOG", "error")
                .output()
                .unwrap()
        };
        // Up when its RPC answers and it owns all three ports (a connect alone could reach another
        // test's server); an exit means a port was taken meanwhile: try others.
        let pid = guard.0.id();
        if !wait_until(&mut guard.0, "garage", &log, || {
            listening_ports(pid).is_superset(&[rpc, s3, web].into())
                && cli(&["status"]).status.success()
        }) {
            continue;
        }
        for p in [rpc, s3, web] {
            reserve_port(p, false);
        }
        let run = |args: &[&str]| {
            let o = cli(args);
            crate::check(&format!("garage {}", args.join(" ")), o)
        };
        let node = run(&["node", "id", "-q"]);
        let node_id = node.trim().split('@').next().unwrap().to_owned();
        run(&["layout", "assign", "-z", "dc1", "-c", "1G", &node_id]);
        run(&["layout", "apply", "--version", "1"]);
        run(&["bucket", "create", bucket]);
        let created = run(&["key", "create", "nixpush-test"]);
        let field = |name: &str| {
            created
                .lines()
                .find_map(|l| l.trim().strip_prefix(name))
                .map(|v| v.trim_start_matches(':').trim().to_owned())
                .unwrap_or_else(|| panic!("no {name} in `garage key create`: {created}"))
        };
        let (access_key, secret_key) = (field("Key ID"), field("Secret key"));
        run(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            bucket,
            "--key",
            "nixpush-test",
        ]);
        run(&["bucket", "website", "--allow", bucket]);
        run(&["bucket", "alias", bucket, GARAGE_WEB_ALIAS]);
        let endpoint = format!("http://127.0.0.1:{s3}");
        wait_for_http(&format!("{endpoint}/"));
        return Parts {
            endpoint,
            region: "garage".into(),
            http_url: Some(format!("http://{GARAGE_WEB_ALIAS}:{web}")),
            access_key,
            secret_key,
            root: None,
            signed: guard,
            others: Vec::new(),
        };
    }
    panic!("garage would not start");
}

fn start_moto(dir: &Path, bucket: &str) -> Parts {
    let server = find_program("moto_server");
    for attempt in 0..5 {
        let log = dir.join(format!("moto-{attempt}.log"));
        let mut cmd = Command::new(&server);
        cmd.args(["-H", "127.0.0.1", "-p", "0"])
            .stdin(Stdio::null());
        let Some((guard, port)) = spawn_listening(&mut cmd, "moto", &log, true) else {
            continue;
        };
        let endpoint = format!("http://127.0.0.1:{port}");
        wait_for_http(&format!("{endpoint}/moto-api/"));
        // moto's own Python (beside the real moto_server, which scripts/lib.sh links to) has boto3,
        // which moto depends on.
        let python = fs::canonicalize(&server).unwrap().with_file_name("python");
        let setup = dir.join("moto_setup.py");
        fs::write(&setup, include_str!("moto_setup.py")).unwrap();
        let out = crate::check(
            "moto set-up",
            Command::new(python)
                .arg(&setup)
                .args([&endpoint, bucket, "us-east-1"])
                .output()
                .unwrap(),
        );
        let keys: serde_json::Value = serde_json::from_str(&out).unwrap();
        return Parts {
            endpoint,
            region: "us-east-1".into(),
            http_url: None,
            access_key: keys["access_key"].as_str().unwrap().to_owned(),
            secret_key: keys["secret_key"].as_str().unwrap().to_owned(),
            root: None,
            signed: guard,
            others: Vec::new(),
        };
    }
    panic!("moto would not start");
}

/// Waits until an HTTP server answers at all (any status).
fn wait_for_http(url: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let addr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(std::time::Instant::now() < deadline, "{url} did not answer");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An anonymous HTTP view of `bucket`: GET and HEAD answered by signed S3 requests. Returns its URL
/// and the accept loop to spawn.
async fn gateway(
    client: Client,
    bucket: String,
) -> (String, impl Future<Output = ()> + Send + 'static) {
    let listener = bind_loopback();
    listener.set_nonblocking(true).unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let listener = tokio::net::TcpListener::from_std(listener).unwrap();
    let serve = async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(gateway_connection(conn, client.clone(), bucket.clone()));
        }
    };
    (url, serve)
}

async fn gateway_connection(mut conn: tokio::net::TcpStream, client: Client, bucket: String) {
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 16 * 1024];
    loop {
        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
            continue;
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end + 4);
        let mut words = head.split_whitespace();
        let (method, target) = (words.next().unwrap_or(""), words.next().unwrap_or("/"));
        let path = target.split('?').next().unwrap().trim_start_matches('/');
        let key = percent_decode_str(path).decode_utf8_lossy().into_owned();
        // (status, Content-Length, body)
        let (status, length, body) = match method {
            "GET" => match client.get_object().bucket(&bucket).key(&key).send().await {
                Ok(o) => match o.body.collect().await {
                    Ok(b) => {
                        let b = b.to_vec();
                        ("200 OK", b.len(), b)
                    }
                    Err(_) => ("502 Bad Gateway", 0, Vec::new()),
                },
                Err(e) if not_found(e.raw_response()) => ("404 Not Found", 0, Vec::new()),
                Err(_) => ("502 Bad Gateway", 0, Vec::new()),
            },
            "HEAD" => match client.head_object().bucket(&bucket).key(&key).send().await {
                Ok(o) => (
                    "200 OK",
                    o.content_length().unwrap_or(0) as usize,
                    Vec::new(),
                ),
                Err(e) if not_found(e.raw_response()) => ("404 Not Found", 0, Vec::new()),
                Err(_) => ("502 Bad Gateway", 0, Vec::new()),
            },
            _ => ("405 Method Not Allowed", 0, Vec::new()),
        };
        let head = format!("HTTP/1.1 {status}\r\nContent-Length: {length}\r\n\r\n");
        if conn.write_all(head.as_bytes()).await.is_err() || conn.write_all(&body).await.is_err() {
            return;
        }
    }
}
