//! Names the commit nixpush is built from, for `nixpush --version`: an operator reporting a problem
//! can then say exactly what runs on the builder.

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn main() {
    // Outside a git checkout (a source tarball), there is no commit to name.
    let commit = git(&["rev-parse", "--short=12", "HEAD"]);
    println!(
        "cargo:rustc-env=NIXPUSH_COMMIT={}",
        commit.as_deref().unwrap_or("commit unknown")
    );
    // Build again when HEAD moves. Its reflog changes with every commit, checkout and reset, also
    // when the branch's ref is packed or lives in another worktree's git directory; HEAD itself
    // covers repositories without a reflog. Only files that exist: cargo reruns a build script on
    // every build for a missing one.
    for name in ["HEAD", "logs/HEAD"] {
        if let Some(path) = git(&["rev-parse", "--path-format=absolute", "--git-path", name])
            && Path::new(&path).is_file()
        {
            println!("cargo:rerun-if-changed={path}");
        }
    }
}
