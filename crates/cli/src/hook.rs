//! `nixpush-hook`: what `post-build-hook` runs.
//!
//! It must never hurt the build: it always exits 0, returns in milliseconds, and before it returns
//! the paths are durably recorded, either acknowledged by the daemon (after its commit) or written
//! to the queue database by the hook itself. Nix runs it with no arguments and passes `OUT_PATHS`
//! (space-separated; empty in Nix 2.8, unset in 2.30–2.31 rebuilds) and `DRV_PATH`. Whatever it
//! prints becomes one `post-build-hook:` line in the build log.

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::process::ExitCode;
use std::time::Duration;

use nixpush_format::StorePath;

use crate::config::Config;
use crate::record::{Recorded, protect, record};
use nixpush_drain::ipc::{WireItem, WireKind};

/// How long to wait for the daemon before writing the queue directly.
const DAEMON_TIMEOUT: Duration = Duration::from_secs(1);

/// What the environment asks to record.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HookInput {
    pub items: Vec<(String, WireKind)>,
    /// (what was given, why it was refused)
    pub invalid: Vec<(String, String)>,
}

/// Reads `OUT_PATHS` and `DRV_PATH` strictly. `OUT_PATHS` is split on whitespace and never globbed
/// (store path names may contain `?` and `=`). With no valid output path, the derivation is recorded
/// instead, for the daemon to resolve its outputs.
pub fn parse_input(out_paths: Option<&OsStr>, drv_path: Option<&OsStr>) -> HookInput {
    let mut input = HookInput::default();
    let mut seen = std::collections::HashSet::new();
    for raw in out_paths
        .map(OsStr::as_bytes)
        .unwrap_or_default()
        .split(|b| b.is_ascii_whitespace())
    {
        if raw.is_empty() {
            continue;
        }
        let shown = String::from_utf8_lossy(raw).into_owned();
        match std::str::from_utf8(raw) {
            Err(_) => input.invalid.push((shown, "not UTF-8".into())),
            Ok(s) => match s.parse::<StorePath>() {
                Ok(p) => {
                    let p = p.to_string();
                    if seen.insert(p.clone()) {
                        input.items.push((p, WireKind::Path));
                    }
                }
                Err(e) => input.invalid.push((shown, e.to_string())),
            },
        }
    }
    if let Some(drv) = drv_path.filter(|d| !d.is_empty() && input.items.is_empty()) {
        let shown = String::from_utf8_lossy(drv.as_bytes()).into_owned();
        match std::str::from_utf8(drv.as_bytes())
            .ok()
            .map(str::parse::<StorePath>)
        {
            Some(Ok(p)) if p.is_derivation() => input.items.push((p.to_string(), WireKind::Drv)),
            Some(Ok(_)) => input.invalid.push((shown, "DRV_PATH is not a .drv".into())),
            Some(Err(e)) => input.invalid.push((shown, e.to_string())),
            None => input.invalid.push((shown, "not UTF-8".into())),
        }
    }
    input
}

pub fn main() -> ExitCode {
    // Whatever happens, the build goes on: report, and exit 0.
    let line = std::panic::catch_unwind(|| {
        run(std::env::var_os("OUT_PATHS"), std::env::var_os("DRV_PATH"))
    })
    .unwrap_or_else(|_| "nixpush-hook: ERROR: internal error; nothing recorded".to_owned());
    // Not println!, which panics when stdout is gone (EPIPE): the paths are recorded by now, and
    // the line is only a courtesy.
    let _ = writeln!(std::io::stdout(), "{line}");
    ExitCode::SUCCESS
}

fn run(out_paths: Option<OsString>, drv_path: Option<OsString>) -> String {
    let input = parse_input(out_paths.as_deref(), drv_path.as_deref());
    let mut problems = String::new();
    if !input.invalid.is_empty() {
        let shown: Vec<String> = input
            .invalid
            .iter()
            .take(3)
            .map(|(p, why)| format!("{p:?} ({why})"))
            .collect();
        let more = input.invalid.len().saturating_sub(3);
        problems = format!(
            "; ignored {} invalid: {}{}",
            input.invalid.len(),
            shown.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        );
    }
    if input.items.is_empty() {
        return format!("nixpush-hook: nothing to queue (no OUT_PATHS or DRV_PATH){problems}");
    }
    let what = describe(&input.items);
    // A broken config must not lose the build, nor record it where no daemon looks: the locations
    // it names are used all the same.
    let (config, config_error) = Config::load_lenient();
    if let Some(e) = config_error {
        problems.push_str(&format!(
            "; ERROR: {e:#}: recorded with the locations read from it (state-dir {}, socket {}); fix it, or the daemon will not start",
            config.state_dir().display(),
            config.socket().display()
        ));
    }
    act_as_owner_of(&config.state_dir());
    let items: Vec<WireItem> = input
        .items
        .iter()
        .map(|(name, kind)| WireItem {
            name: name.clone(),
            kind: *kind,
        })
        .collect();
    if let Some(roots) = config.gc_roots() {
        problems.push_str(&protect(&roots, &items));
    }
    match record(&config, &items, DAEMON_TIMEOUT) {
        Ok(Recorded::Daemon) => format!("nixpush-hook: queued {what} (daemon){problems}"),
        Ok(Recorded::Queue { daemon_error }) => format!(
            "nixpush-hook: queued {what} (daemon not reachable: {daemon_error}; wrote the queue directly){problems}"
        ),
        Ok(Recorded::Spill {
            file,
            daemon_error,
            queue_error,
        }) => format!(
            "nixpush-hook: WARNING: recorded {what} in {} (daemon not reachable: {daemon_error}; \
             queue not writable: {queue_error}); the daemon queues it once the queue has room{problems}",
            file.display()
        ),
        Err(e) => format!(
            "nixpush-hook: ERROR: could not record {what}: {e}; \
             they will not be uploaded unless pushed by hand (nixpush push){problems}"
        ),
    }
}

/// The hook runs as root under nix-daemon; when the daemon runs as its own user, the directories
/// the hook writes (queue, spill, GC roots) are that user's. For file access the hook then takes
/// that user's identity (fsuid/fsgid, which only this process's file operations use), so that a
/// symlink that user planted there cannot make root write anywhere else, and what the hook creates
/// is the daemon's from the start. As root with a root-owned state directory, nothing changes.
fn act_as_owner_of(state_dir: &std::path::Path) {
    use std::os::unix::fs::MetadataExt;
    // SAFETY: geteuid cannot fail and touches no memory.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let Ok(meta) = std::fs::metadata(state_dir) else {
        return;
    };
    if meta.uid() != 0 {
        // SAFETY: setfsgid/setfsuid change this thread's filesystem identity; the hook is single-
        // threaded, and group first, while still root.
        unsafe {
            libc::setfsgid(meta.gid());
            libc::setfsuid(meta.uid());
        }
    }
}

fn describe(items: &[(String, WireKind)]) -> String {
    match items {
        [(drv, WireKind::Drv)] => format!("the outputs of {drv} (no OUT_PATHS from Nix)"),
        [(p, _)] => p.clone(),
        _ => format!("{} paths", items.len()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const P1: &str = "/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-a?b=c";
    const P2: &str = "/nix/store/kwj9jj9i45ga5fz99lvqz4bz4jvasjqg-out";
    const DRV: &str = "/nix/store/kwj9jj9i45ga5fz99lvqz4bz4jvasjqg-x.drv";

    fn os(s: &str) -> OsString {
        OsString::from(s)
    }

    #[test]
    fn output_paths_are_split_validated_and_never_globbed() {
        let i = parse_input(
            Some(&os(&format!("{P1}  {P2} /tmp/x {P1} /nix/store/*"))),
            Some(&os(DRV)),
        );
        assert_eq!(
            i.items,
            vec![
                (P1.to_owned(), WireKind::Path),
                (P2.to_owned(), WireKind::Path)
            ]
        );
        assert_eq!(i.invalid.len(), 2);
        assert!(i.invalid[1].0 == "/nix/store/*");
    }

    #[test]
    fn empty_or_missing_out_paths_fall_back_to_the_derivation() {
        for out in [None, Some(os("")), Some(os("   ")), Some(os("garbage"))] {
            let i = parse_input(out.as_deref(), Some(&os(DRV)));
            assert_eq!(i.items, vec![(DRV.to_owned(), WireKind::Drv)], "{out:?}");
        }
        let i = parse_input(None, Some(&os(P2)));
        assert!(i.items.is_empty() && i.invalid[0].1.contains(".drv"));
        assert_eq!(parse_input(None, None), HookInput::default());
    }

    #[test]
    fn non_utf8_bytes_are_reported_not_fatal() {
        use std::os::unix::ffi::OsStringExt;
        let mut bytes = format!("{P2} ").into_bytes();
        bytes.extend_from_slice(b"/nix/store/\xff\xfe");
        let i = parse_input(Some(&OsString::from_vec(bytes)), None);
        assert_eq!(i.items.len(), 1);
        assert_eq!(i.invalid[0].1, "not UTF-8");
    }

    #[test]
    fn ten_thousand_paths_parse() {
        let paths: Vec<String> = (0..10_000)
            .map(|i| format!("/nix/store/{:0>32}-p{i}", i % 10))
            .collect();
        let i = parse_input(Some(&os(&paths.join(" "))), None);
        assert_eq!(i.items.len(), 10_000);
        assert!(i.invalid.is_empty());
    }

    proptest! {
        #[test]
        fn any_bytes_are_handled(out in proptest::collection::vec(any::<u8>(), 0..300), drv in proptest::collection::vec(any::<u8>(), 0..80)) {
            use std::os::unix::ffi::OsStringExt;
            let i = parse_input(Some(&OsString::from_vec(out)), Some(&OsString::from_vec(drv)));
            for (p, kind) in &i.items {
                let sp: StorePath = p.parse().unwrap();
                prop_assert!(*kind == WireKind::Path || sp.is_derivation());
            }
        }
    }
}
