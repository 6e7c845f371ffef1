//! Store URLs in Nix's syntax: `s3://BUCKET?param=value&…` and `file:///DIR?…`.
//!
//! Users paste what they already give `nix copy --to`, so every parameter Nix's S3 store documents is
//! accepted with Nix's meaning; a parameter Nix does not have is an error naming it (a typo must not
//! silently fall back to a default).

use std::path::PathBuf;
use std::str::FromStr;

use nixpush_format::Compression;
use thiserror::Error;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum UrlError {
    #[error(
        "store URL {0:?} is not supported (expected s3://BUCKET?…, file:///DIR?… or, to read, http(s)://…)"
    )]
    Scheme(String),
    #[error("store URL {url:?}: {why}")]
    Malformed { url: String, why: String },
    #[error("store URL parameter `{0}` is unknown")]
    UnknownParameter(String),
    #[error("store URL parameter `{name}={value}` is invalid: {why}")]
    BadValue {
        name: String,
        value: String,
        why: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    S3 {
        bucket: String,
    },
    File {
        dir: PathBuf,
    },
    /// A cache served over HTTP(S), read anonymously (`nixpush verify`); nixpush does not write to it.
    Http {
        base: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddressingStyle {
    Auto,
    Path,
    Virtual,
}

const MIB: u64 = 1024 * 1024;
/// S3's limits on multipart parts: at least 5 MiB (but the last), at most 5 GiB, at most 10,000.
pub const MIN_PART: u64 = 5 * MIB;
pub const MAX_PART: u64 = 5 * 1024 * MIB;
pub const MAX_PARTS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreUrl {
    pub original: String,
    pub location: Location,
    pub region: String,
    pub endpoint: Option<String>,
    pub profile: Option<String>,
    pub scheme: String,
    pub addressing_style: AddressingStyle,
    pub compression: Compression,
    pub compression_level: Option<i32>,
    pub parallel_compression: bool,
    pub multipart_upload: bool,
    pub multipart_chunk_size: u64,
    pub multipart_threshold: u64,
    pub storage_class: Option<String>,
    pub secret_key_files: Vec<PathBuf>,
    pub want_mass_query: Option<bool>,
    pub priority: Option<u32>,
}

/// `%XX` escapes decoded; `None` for a `%` not followed by two hex digits (which the crate would
/// pass through as it is) or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let well_formed = s.match_indices('%').all(|(i, _)| {
        s.get(i + 1..i + 3)
            .is_some_and(|h| h.bytes().all(|c| c.is_ascii_hexdigit()))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|d| d.into_owned())
}

fn bad(name: &str, value: &str, why: impl Into<String>) -> UrlError {
    UrlError::BadValue {
        name: name.to_owned(),
        value: value.to_owned(),
        why: why.into(),
    }
}

fn boolean(name: &str, v: &str) -> Result<bool, UrlError> {
    match v {
        "true" | "1" => Ok(true),
        "false" | "0" => Ok(false),
        _ => Err(bad(name, v, "expected true or false")),
    }
}

fn number<T: FromStr>(name: &str, v: &str) -> Result<T, UrlError> {
    v.parse().map_err(|_| bad(name, v, "expected a number"))
}

impl StoreUrl {
    /// The part size for an object of `len` bytes: the configured chunk size, raised so that the
    /// object fits in S3's 10,000 parts.
    pub fn part_size(&self, len: u64) -> u64 {
        self.multipart_chunk_size
            .max(len.div_ceil(MAX_PARTS))
            .clamp(MIN_PART, MAX_PART)
    }

    /// Whether an object of `len` bytes goes up in parts.
    pub fn use_multipart(&self, len: u64) -> bool {
        // Above 5 GiB a single PUT is impossible whatever the user asked for.
        (self.multipart_upload && len > self.multipart_threshold) || len > MAX_PART
    }

    /// The URL with its parameters dropped, for messages (parameters may name key files).
    pub fn display_base(&self) -> String {
        self.original
            .split('?')
            .next()
            .unwrap_or_default()
            .to_owned()
    }
}

impl FromStr for StoreUrl {
    type Err = UrlError;

    fn from_str(url: &str) -> Result<Self, UrlError> {
        let malformed = |why: &str| UrlError::Malformed {
            url: url.to_owned(),
            why: why.to_owned(),
        };
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let location = if let Some(bucket) = base.strip_prefix("s3://") {
            if bucket.is_empty() {
                return Err(malformed("no bucket name"));
            }
            if bucket.contains('/') {
                return Err(malformed(
                    "key prefixes (s3://bucket/prefix) are not supported",
                ));
            }
            Location::S3 {
                bucket: bucket.to_owned(),
            }
        } else if let Some(dir) = base.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(malformed(
                    "a file:// URL needs an absolute path (file:///DIR)",
                ));
            }
            Location::File {
                dir: PathBuf::from(percent_decode(dir).ok_or_else(|| malformed("bad %-escape"))?),
            }
        } else if base.starts_with("http://") || base.starts_with("https://") {
            let base = base.trim_end_matches('/');
            if base.ends_with(':') || base.ends_with("//") {
                return Err(malformed("no host"));
            }
            Location::Http {
                base: base.to_owned(),
            }
        } else {
            return Err(UrlError::Scheme(url.to_owned()));
        };
        let mut u = StoreUrl {
            original: url.to_owned(),
            location,
            region: "us-east-1".to_owned(),
            endpoint: None,
            profile: None,
            scheme: "https".to_owned(),
            addressing_style: AddressingStyle::Auto,
            // Nix defaults to xz; zstd is as small within a few percent and many times faster, and
            // every Nix since 2.4 reads it.
            compression: Compression::Zstd,
            compression_level: None,
            // Nix 2.35 made this the default for zstd; uploads are usually CPU-bound on the builder.
            parallel_compression: true,
            // As in Nix: single PUTs (streamed from the spool file, so memory stays flat) unless
            // asked; objects over 5 GiB always go in parts.
            multipart_upload: false,
            multipart_chunk_size: 16 * MIB,
            multipart_threshold: 100 * MIB,
            storage_class: None,
            secret_key_files: Vec::new(),
            want_mass_query: None,
            priority: None,
        };
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, raw) = pair.split_once('=').unwrap_or((pair, ""));
            let v = percent_decode(raw).ok_or_else(|| bad(name, raw, "bad %-escape"))?;
            let v = v.as_str();
            match name {
                "region" => u.region = v.to_owned(),
                "endpoint" => u.endpoint = Some(v.to_owned()).filter(|e| !e.is_empty()),
                "profile" => u.profile = Some(v.to_owned()).filter(|p| !p.is_empty()),
                "scheme" => match v {
                    "http" | "https" => u.scheme = v.to_owned(),
                    _ => return Err(bad(name, v, "expected http or https")),
                },
                "addressing-style" => {
                    u.addressing_style = match v {
                        "auto" => AddressingStyle::Auto,
                        "path" => AddressingStyle::Path,
                        "virtual" => AddressingStyle::Virtual,
                        _ => return Err(bad(name, v, "expected auto, path or virtual")),
                    }
                }
                "compression" => {
                    u.compression = v.parse().map_err(|e| bad(name, v, format!("{e}")))?
                }
                "compression-level" => u.compression_level = Some(number(name, v)?),
                "parallel-compression" => u.parallel_compression = boolean(name, v)?,
                "multipart-upload" => u.multipart_upload = boolean(name, v)?,
                "multipart-chunk-size" | "buffer-size" => {
                    let n: u64 = number(name, v)?;
                    if !(MIN_PART..=MAX_PART).contains(&n) {
                        return Err(bad(name, v, "must be between 5 MiB and 5 GiB (in bytes)"));
                    }
                    u.multipart_chunk_size = n;
                }
                "multipart-threshold" => u.multipart_threshold = number(name, v)?,
                "storage-class" => u.storage_class = Some(v.to_owned()).filter(|s| !s.is_empty()),
                "secret-key" => u.secret_key_files.push(PathBuf::from(v)),
                "secret-keys" => u
                    .secret_key_files
                    .extend(v.split(',').filter(|s| !s.is_empty()).map(PathBuf::from)),
                "write-nar-listing" => {
                    if boolean(name, v)? {
                        // Better refused than silently not written: clients would miss the listings.
                        return Err(bad(name, v, "`.ls` listings are not supported yet"));
                    }
                }
                "want-mass-query" => u.want_mass_query = Some(boolean(name, v)?),
                "priority" => u.priority = Some(number(name, v)?),
                _ => return Err(UrlError::UnknownParameter(name.to_owned())),
            }
        }
        if let (Location::File { .. } | Location::Http { .. }, Some(_)) = (&u.location, &u.endpoint)
        {
            return Err(bad(
                "endpoint",
                u.endpoint.as_deref().unwrap_or_default(),
                "only for s3:// URLs",
            ));
        }
        Ok(u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_what_users_paste() {
        let u: StoreUrl =
            "s3://my-cache?region=eu-west-1&endpoint=https://s3.example.com&profile=ci\
                           &compression=xz&compression-level=9&parallel-compression=true\
                           &secret-key=/etc/nix/sk&secret-keys=/a,/b&storage-class=STANDARD_IA\
                           &multipart-chunk-size=10485760&want-mass-query=true&priority=30"
                .parse()
                .unwrap();
        assert_eq!(
            u.location,
            Location::S3 {
                bucket: "my-cache".into()
            }
        );
        assert_eq!(u.region, "eu-west-1");
        assert_eq!(u.endpoint.as_deref(), Some("https://s3.example.com"));
        assert_eq!(u.profile.as_deref(), Some("ci"));
        assert_eq!(u.compression, Compression::Xz);
        assert_eq!(u.compression_level, Some(9));
        assert!(u.parallel_compression);
        assert_eq!(
            u.secret_key_files,
            vec![PathBuf::from("/etc/nix/sk"), "/a".into(), "/b".into()]
        );
        assert_eq!(u.multipart_chunk_size, 10 * MIB);
        assert_eq!((u.want_mass_query, u.priority), (Some(true), Some(30)));
        assert_eq!(u.display_base(), "s3://my-cache");

        let f: StoreUrl = "file:///srv/nix%20cache?compression=none".parse().unwrap();
        assert_eq!(
            f.location,
            Location::File {
                dir: "/srv/nix cache".into()
            }
        );
        assert_eq!(f.compression, Compression::None);

        let h: StoreUrl = "https://cache.example.org/?priority=30".parse().unwrap();
        assert_eq!(
            h.location,
            Location::Http {
                base: "https://cache.example.org".into()
            }
        );
    }

    #[test]
    fn errors_name_the_problem() {
        assert_eq!(
            "s3://b?compresion=xz".parse::<StoreUrl>().unwrap_err(),
            UrlError::UnknownParameter("compresion".into())
        );
        let e = "s3://b?compression=lz4"
            .parse::<StoreUrl>()
            .unwrap_err()
            .to_string();
        assert!(e.contains("compression=lz4") && e.contains("xz"), "{e}");
        assert!(matches!(
            "ftp://x".parse::<StoreUrl>(),
            Err(UrlError::Scheme(_))
        ));
        assert!(matches!(
            "https://".parse::<StoreUrl>(),
            Err(UrlError::Malformed { .. })
        ));
        assert!(matches!(
            "s3://".parse::<StoreUrl>(),
            Err(UrlError::Malformed { .. })
        ));
        assert!(matches!(
            "file://rel/dir".parse::<StoreUrl>(),
            Err(UrlError::Malformed { .. })
        ));
        assert!(matches!(
            "s3://b?multipart-chunk-size=1024".parse::<StoreUrl>(),
            Err(UrlError::BadValue { .. })
        ));
        assert!(matches!(
            "s3://b?parallel-compression=yes".parse::<StoreUrl>(),
            Err(UrlError::BadValue { .. })
        ));
    }

    #[test]
    fn nar_listings_are_refused_not_ignored() {
        let e = "s3://b?write-nar-listing=true"
            .parse::<StoreUrl>()
            .unwrap_err();
        assert!(e.to_string().contains("write-nar-listing=true"), "{e}");
        assert!("s3://b?write-nar-listing=false".parse::<StoreUrl>().is_ok());
    }

    #[test]
    fn parts_stay_within_s3_limits() {
        let u: StoreUrl = "s3://b?multipart-upload=true".parse().unwrap();
        assert_eq!(u.part_size(1), 16 * MIB);
        // 1 TiB in 16 MiB parts would be 65,536 parts; the size is raised instead.
        let tib = 1024 * 1024 * MIB;
        assert!(tib.div_ceil(u.part_size(tib)) <= MAX_PARTS);
        assert!(!u.use_multipart(100 * MIB));
        assert!(u.use_multipart(100 * MIB + 1));
        let single: StoreUrl = "s3://b?multipart-upload=false".parse().unwrap();
        assert!(!single.use_multipart(MAX_PART));
        assert!(single.use_multipart(MAX_PART + 1));
    }

    proptest! {
        #[test]
        // Up to S3's largest object, 5 TiB.
        fn part_size_always_fits(len in 0u64..=(5 * 1024 * 1024 * MIB)) {
            let u: StoreUrl = "s3://b".parse().unwrap();
            let p = u.part_size(len);
            prop_assert!((MIN_PART..=MAX_PART).contains(&p));
            prop_assert!(len.div_ceil(p) <= MAX_PARTS);
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = format!("s3://b?{s}").parse::<StoreUrl>();
            let _ = s.parse::<StoreUrl>();
        }
    }
}
