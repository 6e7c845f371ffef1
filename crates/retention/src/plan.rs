//! The collector's decisions, as pure functions of what it listed. Objects are named by key:
//! a narinfo by its store path's hash part, a NAR by its object key.

use std::collections::{BTreeMap, BTreeSet};

/// What the collector needs of one narinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Hash parts of the paths it references (itself excluded).
    pub references: Vec<String>,
    /// Its NAR's object key (`URL:`).
    pub nar: String,
}

/// The narinfos reachable from `roots` over references. A root or reference with no narinfo is
/// not in the result (nothing to keep), and what lies past it is reached only through others.
pub fn live<'a>(
    roots: impl IntoIterator<Item = &'a str>,
    narinfos: &BTreeMap<String, Node>,
) -> BTreeSet<String> {
    let mut live = BTreeSet::new();
    let mut todo: Vec<&str> = roots.into_iter().collect();
    while let Some(hash) = todo.pop() {
        let Some(node) = narinfos.get(hash) else {
            continue;
        };
        if live.insert(hash.to_owned()) {
            todo.extend(node.references.iter().map(String::as_str));
        }
    }
    live
}

/// `dead` in layers: each narinfo is in a layer before any it references, so that deleting the
/// layers one after the other (each one's members in any order, at once) never leaves a narinfo
/// whose reference is gone, as long as what remains was closed under references to begin with.
/// (References among dead narinfos only; a store has no cycles, and one here is broken at its
/// smallest member.)
pub fn deletion_layers(
    dead: &BTreeSet<String>,
    narinfos: &BTreeMap<String, Node>,
) -> Vec<Vec<String>> {
    // Kahn's algorithm on the dead subgraph: a narinfo is ready once no dead narinfo left refers
    // to it.
    let refs = |h: &str| narinfos.get(h).map_or(&[][..], |n| &n.references[..]);
    let mut referrers: BTreeMap<&str, usize> = dead.iter().map(|h| (h.as_str(), 0)).collect();
    for hash in dead {
        for r in refs(hash) {
            if r != hash
                && let Some(n) = referrers.get_mut(r.as_str())
            {
                *n += 1;
            }
        }
    }
    let mut layers = Vec::new();
    while !referrers.is_empty() {
        let mut layer: Vec<&str> = referrers
            .iter()
            .filter(|(_, n)| **n == 0)
            .map(|(h, _)| *h)
            .collect();
        if layer.is_empty() {
            layer.push(referrers.keys().next().expect("not empty"));
        }
        for h in &layer {
            referrers.remove(h);
        }
        for h in &layer {
            for r in refs(h) {
                if let Some(n) = referrers.get_mut(r.as_str()) {
                    *n = n.saturating_sub(1);
                }
            }
        }
        layers.push(layer.into_iter().map(str::to_owned).collect());
    }
    layers
}

/// [`deletion_layers`], one after the other.
pub fn deletion_order(dead: &BTreeSet<String>, narinfos: &BTreeMap<String, Node>) -> Vec<String> {
    deletion_layers(dead, narinfos).concat()
}

/// The NARs among `nars` that nothing needs: no surviving narinfo points to them, and `protected`
/// (those push sessions relied on, those written recently) does not name them. Computed from the
/// narinfos that survive, never from the dead ones: two store paths with identical contents share
/// one NAR, and the live one still needs it.
pub fn nar_garbage<'a>(
    nars: impl IntoIterator<Item = &'a str>,
    surviving: impl IntoIterator<Item = &'a Node>,
    protected: &BTreeSet<String>,
) -> BTreeSet<String> {
    let needed: BTreeSet<&str> = surviving.into_iter().map(|n| n.nar.as_str()).collect();
    nars.into_iter()
        .filter(|k| !needed.contains(k) && !protected.contains(*k))
        .map(str::to_owned)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Node> {
        edges
            .iter()
            .map(|(h, refs)| {
                (
                    h.to_string(),
                    Node {
                        references: refs.iter().map(|r| r.to_string()).collect(),
                        nar: format!("nar/{h}"),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn live_is_the_closure_of_the_roots() {
        let g = graph(&[("a", &[]), ("b", &["a"]), ("c", &["b", "x"]), ("d", &["a"])]);
        let live = live(["c", "missing"], &g);
        assert_eq!(live, ["a", "b", "c"].map(String::from).into());
    }

    #[test]
    fn a_nar_shared_with_a_surviving_narinfo_is_kept() {
        let mut g = graph(&[("live", &[]), ("dead", &[])]);
        g.get_mut("dead").unwrap().nar = "nar/live".into();
        let surviving = [g["live"].clone()];
        let garbage = nar_garbage(["nar/live", "nar/orphan"], &surviving, &BTreeSet::new());
        assert_eq!(garbage, ["nar/orphan".to_owned()].into());
        let protected = ["nar/orphan".to_owned()].into();
        assert!(nar_garbage(["nar/orphan"], &surviving, &protected).is_empty());
    }

    /// A random store-like graph: each node references only earlier ones.
    fn dag() -> impl Strategy<Value = BTreeMap<String, Node>> {
        (1usize..24).prop_flat_map(|n| {
            proptest::collection::vec(
                proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
                n,
            )
            .prop_map(move |refs| {
                refs.iter()
                    .enumerate()
                    .map(|(i, rs)| {
                        let references = if i == 0 {
                            vec![]
                        } else {
                            rs.iter().map(|r| format!("p{}", r.index(i))).collect()
                        };
                        (
                            format!("p{i}"),
                            Node {
                                references,
                                nar: format!("nar/{i}"),
                            },
                        )
                    })
                    .collect()
            })
        })
    }

    fn closed(present: &BTreeSet<String>, g: &BTreeMap<String, Node>) -> bool {
        present
            .iter()
            .all(|h| g[h].references.iter().all(|r| present.contains(r)))
    }

    proptest! {
        /// Deleting the dead narinfos one at a time in this order never leaves a narinfo whose
        /// reference is gone, and deletes exactly the dead ones.
        #[test]
        fn every_prefix_of_the_deletion_order_leaves_the_cache_closed(
            g in dag(),
            roots in proptest::collection::vec(any::<prop::sample::Index>(), 0..4),
        ) {
            let all: Vec<String> = g.keys().cloned().collect();
            let roots: Vec<&str> = roots.iter().map(|r| all[r.index(all.len())].as_str()).collect();
            let live = live(roots, &g);
            let dead: BTreeSet<String> = all.iter().filter(|h| !live.contains(*h)).cloned().collect();
            let order = deletion_order(&dead, &g);
            prop_assert_eq!(order.iter().cloned().collect::<BTreeSet<_>>(), dead);
            let mut present: BTreeSet<String> = all.iter().cloned().collect();
            prop_assert!(closed(&present, &g));
            for h in order {
                present.remove(&h);
                prop_assert!(closed(&present, &g), "after deleting {}", h);
            }
            prop_assert_eq!(present, live);
        }

        /// Within a layer, no member references another: deleting them at once, in any order,
        /// keeps the cache closed.
        #[test]
        fn no_member_of_a_layer_references_another(g in dag()) {
            let dead: BTreeSet<String> = g.keys().cloned().collect();
            for layer in deletion_layers(&dead, &g) {
                let members: BTreeSet<&String> = layer.iter().collect();
                for h in &layer {
                    prop_assert!(g[h].references.iter().all(|r| !members.contains(r)));
                }
            }
        }
    }
}
