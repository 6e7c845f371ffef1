//! `nixpush keygen`: a drop-in for `nix-store --generate-binary-cache-key`.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nixpush_format::SecretKey;

/// Make a signing key pair in Nix's format
#[derive(clap::Args)]
pub struct Args {
    /// Key name, conventionally `<cache host>-<n>` (e.g. `cache.example.org-1`)
    name: String,
    /// Where to write the secret key (created with mode 0600)
    secret_file: PathBuf,
    /// Where to write the public key (for `trusted-public-keys`)
    public_file: PathBuf,
    /// Replace existing key files
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args) -> Result<()> {
    let key = SecretKey::generate(&args.name)?;
    for f in [&args.secret_file, &args.public_file] {
        let Ok(meta) = f.symlink_metadata() else {
            continue;
        };
        if !args.force {
            bail!("{} already exists; pass --force to replace it", f.display());
        }
        // --force renames over the old entry; done to a device such as /dev/null (as root) it
        // would replace the device node with a regular file.
        let kind = meta.file_type();
        if !kind.is_file() && !kind.is_symlink() {
            bail!(
                "{} exists and is not a regular file; refusing to replace it",
                f.display()
            );
        }
    }
    write_atomically(
        &args.secret_file,
        &key.to_secret_file_contents(),
        0o600,
        args.force,
    )
    .with_context(|| {
        format!(
            "cannot write secret key file {}",
            args.secret_file.display()
        )
    })?;
    let public = key.public_key().to_string();
    if let Err(e) = write_atomically(&args.public_file, &public, 0o644, args.force) {
        // Never leave half a key pair behind.
        let _ = fs::remove_file(&args.secret_file);
        return Err(e).with_context(|| {
            format!(
                "cannot write public key file {}",
                args.public_file.display()
            )
        });
    }
    println!("{public}");
    Ok(())
}

/// Writes `contents` to a fresh file created with `mode` (so a secret is never readable by others,
/// not even for a moment), fsyncs it, then moves it into place: readers see the whole file or none.
fn write_atomically(dest: &Path, contents: &str, mode: u32, replace: bool) -> Result<()> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let name = dest
        .file_name()
        .context("not a file name")?
        .to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    let result = f
        .write_all(contents.as_bytes())
        .and_then(|()| f.sync_all())
        .and_then(|()| {
            if replace {
                fs::rename(&tmp, dest)
            } else {
                fs::hard_link(&tmp, dest)
            }
        });
    let _ = fs::remove_file(&tmp);
    result?;
    if let Ok(d) = fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}
