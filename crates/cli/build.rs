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
    // Build again when HEAD moves: a checkout changes HEAD, a commit changes the branch's ref.
    // Only files that exist: cargo reruns a build script on every build for a missing one.
    if let Some(dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        let branch = git(&["symbolic-ref", "-q", "HEAD"]).unwrap_or_default();
        for file in ["HEAD", "packed-refs", branch.as_str()] {
            let path = Path::new(&dir).join(file);
            if !file.is_empty() && path.is_file() {
                println!("cargo:rerun-if-changed={}", path.display());
            }
        }
    }
}
