//! Named pins, stored in the cache under `nixpush/pins/<name>.json`: the closures of the pinned
//! paths are kept by every collection, until the pin is removed or expires.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nixpush_cache::{CacheError, Objects};
use nixpush_format::StorePath;
use nixpush_format::cache_keys::narinfo_key;
use serde::{Deserialize, Serialize};

use crate::RetentionError;

pub const PINS_PREFIX: &str = "nixpush/pins/";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    /// Full store paths.
    pub paths: Vec<String>,
    /// Unix seconds.
    pub created: u64,
    /// Unix seconds; a pin past it no longer keeps anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
}

impl Pin {
    pub fn expired(&self, now: SystemTime) -> bool {
        self.expires
            .is_some_and(|e| UNIX_EPOCH + Duration::from_secs(e) <= now)
    }

    /// Hash parts of the pinned paths; a path that does not parse is an error (a pin must not
    /// silently keep less than it says).
    pub fn hashes(&self) -> Result<Vec<String>, String> {
        self.paths
            .iter()
            .map(|p| {
                p.parse::<StorePath>()
                    .map(|p| p.hash_part().to_owned())
                    .map_err(|e| format!("{p:?}: {e}"))
            })
            .collect()
    }
}

/// A pin name: what is safe as one key component.
pub fn check_name(name: &str) -> Result<(), RetentionError> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(RetentionError::BadPinName(name.to_owned()))
    }
}

fn key(name: &str) -> String {
    format!("{PINS_PREFIX}{name}.json")
}

/// Pins `paths` under `name` (replacing a pin of that name). Each path must be in the cache: a pin
/// of what is not there would keep nothing. As a push does, the pin is written first, then the
/// collector's state is looked at (waiting while it deletes), and only then is the cache asked:
/// a collection that did not see the pin has finished deleting by then.
pub async fn pin(
    objects: &Objects,
    name: &str,
    paths: &[StorePath],
    expires_in: Option<Duration>,
) -> Result<Pin, RetentionError> {
    check_name(name)?;
    let now = SystemTime::now();
    let secs = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let pin = Pin {
        paths: paths.iter().map(ToString::to_string).collect(),
        created: secs(now),
        expires: expires_in.map(|d| secs(now + d)),
    };
    let body = serde_json::to_vec_pretty(&pin).expect("a pin serializes");
    objects.put(&key(name), body, "application/json").await?;
    objects.look().await?;
    for p in paths {
        if objects.head(&narinfo_key(p)).await?.is_none() {
            objects.delete(&key(name)).await?;
            return Err(RetentionError::NotInCache(p.to_string()));
        }
    }
    Ok(pin)
}

/// Removes a pin; returns whether there was one.
pub async fn unpin(objects: &Objects, name: &str) -> Result<bool, RetentionError> {
    check_name(name)?;
    let existed = objects.head(&key(name)).await?.is_some();
    objects.delete(&key(name)).await?;
    Ok(existed)
}

/// Every pin, by name. A pin that does not parse is an error: a collection must not run as if it
/// kept nothing.
pub async fn list(objects: &Objects) -> Result<Vec<(String, Pin)>, RetentionError> {
    let mut pins = Vec::new();
    for entry in objects.list(PINS_PREFIX, true).await? {
        let Some(name) = entry
            .key
            .strip_prefix(PINS_PREFIX)
            .and_then(|n| n.strip_suffix(".json"))
        else {
            continue;
        };
        let Some(body) = objects.get(&entry.key).await? else {
            continue;
        };
        let pin = serde_json::from_slice(&body).map_err(|e| CacheError::BadRecord {
            key: entry.key.clone(),
            message: e.to_string(),
        })?;
        pins.push((name.to_owned(), pin));
    }
    Ok(pins)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_safe_key_component() {
        for good in ["release-24.11", "prod_web", "a"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "a/b", ".hidden", "sp ace", "ü"] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_pin_expires_at_its_time() {
        let pin = Pin {
            paths: vec![],
            created: 0,
            expires: Some(100),
        };
        assert!(!pin.expired(UNIX_EPOCH + Duration::from_secs(99)));
        assert!(pin.expired(UNIX_EPOCH + Duration::from_secs(100)));
    }
}
