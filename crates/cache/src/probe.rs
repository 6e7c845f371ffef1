//! Which narinfos a cache already has, for the paths a push may upload.
//!
//! On S3 every question is a round trip. A push of many paths lists the bucket instead: a page of
//! the listing begun just before a path's narinfo answers for that path and every later one up to
//! the page's last key, up to 1,000 keys at once. The paths go in runs of neighbours in key order,
//! each run listed on its own, all runs at once. Where the bucket is so full that its keys lie far
//! apart (a page answers few of the run's paths), or a listing fails, the rest of the run is asked
//! about one HEAD at a time, as a small push always is.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::error::{CacheError, error_chain};
use crate::target::Target;

/// Fewer paths than this are asked about one by one: a listing answers for fewer keys than it reads.
const LIST_FROM: usize = 16;
/// Runs listed at once, at most: a push of 1,000 paths lists 32 pages, in one round trip.
const RUNS: usize = 32;
/// A page that answers fewer of its run's paths than this ends the listing of the run: the bucket
/// holds too many keys between them for pages to beat HEADs.
const WORTH_A_PAGE: usize = 4;

/// One page of the bucket's listing, shallow (keys below a `/` are summed up by their prefix).
#[derive(Debug, Default)]
pub(crate) struct Page {
    /// The keys of the page's objects, in order.
    pub keys: Vec<String>,
    /// The greatest key or prefix the page covered; `None` for an empty page.
    pub last: Option<String>,
    /// More keys follow `last`.
    pub truncated: bool,
}

/// Where a listing that includes `key` starts (exclusive): `key` without its last character, which
/// sorts just before it.
fn start_after(key: &str) -> &str {
    key.char_indices().last().map_or(key, |(i, _)| &key[..i])
}

/// The paths of `run` (sorted narinfo keys, the page listed from just before the first) that `page`
/// answers for, with whether each is present: all of them if the page is the listing's end, else
/// those up to its last key.
fn answered<'r>(run: &'r [String], page: &Page) -> Vec<(&'r String, bool)> {
    let keys: std::collections::HashSet<&str> = page.keys.iter().map(String::as_str).collect();
    run.iter()
        .take_while(|k| !page.truncated || page.last.as_deref().is_some_and(|l| k.as_str() <= l))
        .map(|k| (k, keys.contains(k.as_str())))
        .collect()
}

/// What became of a run, or of one question.
enum Outcome {
    /// Answered by listing, and the rest of the run, to ask one by one.
    Listed(Vec<(String, bool)>, Vec<String>),
    Asked(String, Result<bool, CacheError>),
}

/// Whether each of `keys` (narinfo keys) is in the cache. At most as many requests at once as
/// `slots` has permits. Only S3 is listed: a directory answers a question with a `stat`.
pub(crate) async fn present(
    target: &Arc<Target>,
    slots: &Arc<Semaphore>,
    mut keys: Vec<String>,
) -> HashMap<String, Result<bool, CacheError>> {
    keys.sort();
    keys.dedup();
    let mut found = HashMap::with_capacity(keys.len());
    let mut set = JoinSet::new();
    let ask = |set: &mut JoinSet<Outcome>, key: String| {
        let (target, slots) = (target.clone(), slots.clone());
        set.spawn(async move {
            let _slot = slots.acquire().await;
            let has = target.exists(&key).await;
            Outcome::Asked(key, has)
        });
    };
    if target.is_s3() && keys.len() >= LIST_FROM {
        let per_run = keys.len().div_ceil(RUNS).max(LIST_FROM / 2);
        for run in keys.chunks(per_run) {
            let (target, slots, run) = (target.clone(), slots.clone(), run.to_vec());
            set.spawn(async move {
                let pages = |after: String| {
                    let (target, slots) = (target.clone(), slots.clone());
                    async move {
                        let _slot = slots.acquire().await;
                        target.list_page(&after).await
                    }
                };
                let (answers, rest) = list_run(run, pages).await;
                Outcome::Listed(answers, rest)
            });
        }
    } else {
        for key in keys {
            ask(&mut set, key);
        }
    }
    while let Some(joined) = set.join_next().await {
        match joined.expect("narinfo probe panicked") {
            Outcome::Listed(answers, rest) => {
                found.extend(answers.into_iter().map(|(k, has)| (k, Ok(has))));
                for key in rest {
                    ask(&mut set, key);
                }
            }
            Outcome::Asked(key, has) => {
                found.insert(key, has);
            }
        }
    }
    found
}

/// Lists pages (from `page`, given where to start) from just before the first unanswered path of
/// `run` while they answer enough of it; returns the answers and the paths left to ask about.
async fn list_run<F: Future<Output = Result<Option<Page>, CacheError>>>(
    run: Vec<String>,
    mut page: impl FnMut(String) -> F,
) -> (Vec<(String, bool)>, Vec<String>) {
    let mut answers = Vec::with_capacity(run.len());
    let mut next = 0;
    while next < run.len() {
        let listed = match page(start_after(&run[next]).to_owned()).await {
            Ok(Some(listed)) => listed,
            Ok(None) => break,
            Err(e) => {
                tracing::debug!(error = %error_chain(&e), "listing the cache failed; asking path by path");
                break;
            }
        };
        let got = answered(&run[next..], &listed);
        let n = got.len();
        answers.extend(got.into_iter().map(|(k, has)| (k.clone(), has)));
        next += n;
        if n < WORTH_A_PAGE {
            break;
        }
    }
    let rest = run[next..].to_vec();
    (answers, rest)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    /// A shallow page of `bucket` after `after`, of at most `max` entries, as S3 lists it.
    fn page_of(bucket: &BTreeSet<String>, after: &str, max: usize) -> Page {
        use std::ops::Bound;
        let mut entries: Vec<(String, bool)> = Vec::new();
        let mut truncated = false;
        for key in bucket.range::<str, _>((Bound::Excluded(after), Bound::Unbounded)) {
            let entry = match key.find('/') {
                Some(i) => (key[..=i].to_owned(), false),
                None => (key.clone(), true),
            };
            if entries.last().is_some_and(|(e, _)| *e == entry.0) {
                continue;
            }
            if entries.len() == max {
                truncated = true;
                break;
            }
            entries.push(entry);
        }
        Page {
            keys: entries
                .iter()
                .filter(|(_, object)| *object)
                .map(|(k, _)| k.clone())
                .collect(),
            last: entries.last().map(|(k, _)| k.clone()),
            truncated,
        }
    }

    /// [`list_run`] over a model bucket, with pages of at most `max` entries.
    fn listed(
        bucket: &BTreeSet<String>,
        run: &[String],
        max: usize,
    ) -> (Vec<(String, bool)>, Vec<String>) {
        let pages = |after: String| std::future::ready(Ok(Some(page_of(bucket, &after, max))));
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(list_run(run.to_vec(), pages))
    }

    /// Drawn from few values, so that the bucket and the run share many; some sort between `log/`
    /// and `nar/` and the keys beside them (`l0` and `lz`, `na` and `nb`).
    fn hash() -> impl Strategy<Value = String> {
        "[0-9a-z][0abz]?"
    }

    proptest! {
        /// Every path of a run is answered truly or left to ask: whatever the bucket holds beside
        /// narinfos (`.ls` files, NARs and logs below prefixes), however small its pages.
        #[test]
        fn a_listing_answers_truly_or_leaves_the_path_to_ask(
            held in proptest::collection::btree_set(hash(), 0..48),
            others in proptest::collection::btree_set(hash(), 0..48),
            asked in proptest::collection::btree_set(hash(), 1..48),
            max in 1usize..8,
        ) {
            let mut bucket: BTreeSet<String> = held.iter().map(|h| format!("{h}.narinfo")).collect();
            for h in &others {
                bucket.insert(format!("{h}.ls"));
                bucket.insert(format!("nar/{h}.nar.zst"));
                bucket.insert(format!("log/{h}-x.drv"));
            }
            bucket.insert("nix-cache-info".into());
            let run: Vec<String> = asked.iter().map(|h| format!("{h}.narinfo")).collect();
            let (answers, rest) = listed(&bucket, &run, max);
            prop_assert_eq!(answers.len() + rest.len(), run.len());
            for (i, (key, has)) in answers.iter().enumerate() {
                prop_assert_eq!(key, &run[i], "answers come in order, from the run's start");
                prop_assert_eq!(*has, bucket.contains(key));
            }
            prop_assert_eq!(&rest[..], &run[answers.len()..]);
        }
    }

    #[test]
    fn a_page_that_ends_the_listing_answers_for_everything_after_it() {
        let bucket: BTreeSet<String> = ["a1.narinfo", "b2.narinfo"].map(String::from).into();
        let run: Vec<String> = ["a1.narinfo", "a3.narinfo", "z9.narinfo"]
            .map(String::from)
            .into();
        let (answers, rest) = listed(&bucket, &run, 1000);
        assert_eq!(
            answers,
            vec![
                ("a1.narinfo".to_owned(), true),
                ("a3.narinfo".to_owned(), false),
                ("z9.narinfo".to_owned(), false),
            ]
        );
        assert!(rest.is_empty());
    }

    #[test]
    fn a_full_bucket_sends_the_run_to_heads_after_one_page() {
        // A thousand keys between each pair of the run's paths: a page answers one of them.
        let mut bucket = BTreeSet::new();
        for i in 0..5_000 {
            bucket.insert(format!("{i:05}.narinfo"));
        }
        let run: Vec<String> = (0..5)
            .map(|i| format!("{:05}.narinfo", i * 1000 + 500))
            .collect();
        let (answers, rest) = listed(&bucket, &run, 1000);
        assert_eq!(answers, vec![(run[0].clone(), true)]);
        assert_eq!(rest, run[1..].to_vec());
    }
}
