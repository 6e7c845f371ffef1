//! What a collection does to objects, on each S3 server of the test bed: listings that carry times
//! and entity tags, and deletions a thousand keys a request (DeleteObjects, with the Content-MD5
//! that S3 demands), sent again for the keys a busy server failed. The collection tests can age
//! objects only where they are files (s3s-fs), so on Garage and moto they delete nothing; these are
//! the requests they would have made.

use std::collections::BTreeSet;

use nixpush_cache::{Objects, StoreUrl};
use nixpush_testbed::{Fault, Faults, Relay, RelayConfig, RequestMatch, S3Kind, S3Server};

/// Keys in two hashed shards, one of them more than a page of listing, and two DeleteObjects
/// batches.
const KEYS: usize = 1_105;

#[test]
fn objects_are_listed_with_times_and_tags_and_deleted_in_batches_on_every_server() {
    // The AWS credential chain reads a credentials file named by the environment; the environment
    // is set once, before this process starts a thread, and the file rewritten for each server.
    let credentials = tempfile::NamedTempFile::new().unwrap();
    // SAFETY: no other thread exists yet.
    unsafe {
        for taken_first in [
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "AWS_SESSION_TOKEN",
            "AWS_PROFILE",
        ] {
            std::env::remove_var(taken_first);
        }
        std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", credentials.path());
        std::env::set_var("AWS_CONFIG_FILE", "/nonexistent");
        std::env::set_var("AWS_EC2_METADATA_DISABLED", "true");
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let serve = |kind| {
        let s3 = S3Server::start_kind(kind);
        std::fs::write(
            credentials.path(),
            format!(
                "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
                s3.access_key, s3.secret_key
            ),
        )
        .unwrap();
        s3
    };
    for kind in [S3Kind::S3sFs, S3Kind::Garage, S3Kind::Moto] {
        let s3 = serve(kind);
        let keys: Vec<String> = (0..KEYS)
            .map(|i| {
                let shard = if i < 1_050 { '0' } else { 'z' };
                format!("{shard}{i:031}.narinfo")
            })
            .collect();
        s3.put_all(keys.iter().map(|k| (k.clone(), b"x".to_vec())).collect());
        s3.put("nixpush/gc/state.json", b"{}");
        let url: StoreUrl = s3.store_url("").parse().unwrap();
        rt.block_on(async {
            let objects = Objects::open(&url, None).await.unwrap();
            let listed = objects.list_hashed("", true).await.unwrap();
            let names: BTreeSet<&str> = listed.iter().map(|e| e.key.as_str()).collect();
            assert_eq!(names.len(), KEYS, "{kind:?}: the hashed listing");
            // s3s-fs lists no entity tags (the memo of parsed narinfos then keys on size and
            // time); the others do.
            let tagged = kind != S3Kind::S3sFs;
            assert!(
                listed
                    .iter()
                    .all(|e| e.modified.is_some() && e.etag.is_some() == tagged && e.size == 1),
                "{kind:?}: {:?}",
                listed
                    .iter()
                    .find(|e| e.modified.is_none() || e.etag.is_some() != tagged)
            );
            for batch in keys.chunks(1000) {
                objects.delete_many(batch).await.unwrap();
            }
            // Deleting what is gone already is no error: two collectors' plans may overlap.
            objects.delete_many(&keys[..3]).await.unwrap();
        });
        assert_eq!(s3.keys(), ["nixpush/gc/state.json"], "{kind:?}");
    }

    // A DeleteObjects that succeeds but fails each of its keys (S3's InternalError under load,
    // Garage's ServiceUnavailable when its database is locked) is sent again for those keys; a
    // server that stays busy is given up on after five requests, naming a key.
    let s3 = serve(S3Kind::S3sFs);
    let keys: Vec<String> = (0..5).map(|i| format!("{i:032}.narinfo")).collect();
    s3.put_all(keys.iter().map(|k| (k.clone(), b"x".to_vec())).collect());
    let busy = |limit| {
        Relay::start(
            &s3.endpoint,
            RelayConfig {
                faults: Faults {
                    limit,
                    only: Some(RequestMatch {
                        method: "POST".into(),
                        target_contains: "delete".into(),
                    }),
                    ..Faults::always(Fault::KeysBusy)
                },
                one_request_per_connection: true,
                ..RelayConfig::default()
            },
        )
    };
    let delete = |relay: &Relay| {
        let url: StoreUrl = s3.store_url_at(&relay.endpoint, "").parse().unwrap();
        rt.block_on(async {
            let objects = Objects::open(&url, None).await.unwrap();
            objects.delete_many(&keys).await
        })
    };
    let always = busy(None);
    let e = delete(&always).unwrap_err().to_string();
    assert!(e.contains(&keys[0]) && e.contains("InternalError"), "{e}");
    assert_eq!(always.injected().get(&Fault::KeysBusy), Some(&5));
    assert_eq!(s3.keys().len(), 5);
    let twice = busy(Some(2));
    delete(&twice).unwrap();
    assert_eq!(twice.injected().get(&Fault::KeysBusy), Some(&2));
    assert!(s3.keys().is_empty(), "{:?}", s3.keys());
}
