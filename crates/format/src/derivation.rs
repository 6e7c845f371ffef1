//! The outputs of a derivation (`.drv`), read from its ATerm text.
//!
//! Only the first field of `Derive(...)` is parsed: the list of `(name, path, hashAlgo, hash)`
//! tuples. That is what a post-build hook needs when Nix gives it `DRV_PATH` but no `OUT_PATHS`:
//! which paths to protect from garbage collection until they are uploaded, without asking the
//! daemon.

use thiserror::Error;

use crate::StorePath;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DerivationError {
    #[error("not a derivation: {0}")]
    Syntax(String),
    #[error("output `{name}` has a bad path: {message}")]
    BadOutputPath { name: String, message: String },
}

/// One output: its name, and its path when the derivation fixes it (input-addressed and fixed-output
/// derivations do; floating content-addressed ones learn it only when built).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerivationOutput {
    pub name: String,
    pub path: Option<StorePath>,
}

/// The outputs listed in a `.drv` file's text, in their order.
pub fn derivation_outputs(text: &str) -> Result<Vec<DerivationOutput>, DerivationError> {
    let mut p = Parser { rest: text };
    p.expect("Derive(")?;
    p.expect("[")?;
    let mut outputs = Vec::new();
    if p.eat("]") {
        return Ok(outputs);
    }
    loop {
        p.expect("(")?;
        let name = p.string()?;
        p.expect(",")?;
        let path = p.string()?;
        p.expect(",")?;
        p.string()?;
        p.expect(",")?;
        p.string()?;
        p.expect(")")?;
        let path = if path.is_empty() {
            None
        } else {
            Some(
                path.parse()
                    .map_err(|e: crate::store_path::StorePathError| {
                        DerivationError::BadOutputPath {
                            name: name.clone(),
                            message: e.to_string(),
                        }
                    })?,
            )
        };
        outputs.push(DerivationOutput { name, path });
        if p.eat("]") {
            return Ok(outputs);
        }
        p.expect(",")?;
    }
}

struct Parser<'a> {
    rest: &'a str,
}

impl Parser<'_> {
    fn eat(&mut self, token: &str) -> bool {
        match self.rest.strip_prefix(token) {
            Some(r) => {
                self.rest = r;
                true
            }
            None => false,
        }
    }

    fn expect(&mut self, token: &str) -> Result<(), DerivationError> {
        if self.eat(token) {
            Ok(())
        } else {
            let near: String = self.rest.chars().take(20).collect();
            Err(DerivationError::Syntax(format!(
                "expected `{token}` at {near:?}"
            )))
        }
    }

    /// A quoted string with ATerm escapes (`\"`, `\\`, `\n`, `\r`, `\t`).
    fn string(&mut self) -> Result<String, DerivationError> {
        self.expect("\"")?;
        let mut out = String::new();
        let mut chars = self.rest.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    self.rest = &self.rest[i + 1..];
                    return Ok(out);
                }
                '\\' => match chars.next() {
                    Some((_, 'n')) => out.push('\n'),
                    Some((_, 'r')) => out.push('\r'),
                    Some((_, 't')) => out.push('\t'),
                    Some((_, c)) => out.push(c),
                    None => break,
                },
                c => out.push(c),
            }
        }
        Err(DerivationError::Syntax("unterminated string".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const OUT: &str = "/nix/store/hcz0rpyq8sljlg33vz0pl29n35k4d2w3-two";
    const DEV: &str = "/nix/store/kwj9jj9i45ga5fz99lvqz4bz4jvasjqg-two-dev";

    #[test]
    fn outputs_are_read_in_order_with_floating_ones_unknown() {
        let text = format!(
            "Derive([(\"dev\",\"{DEV}\",\"\",\"\"),(\"out\",\"{OUT}\",\"\",\"\"),\
             (\"ca\",\"\",\"r:sha256\",\"\")],[(\"/nix/store/x.drv\",[\"out\"])],[],\
             \"x86_64-linux\",\"/bin/sh\",[\"-c\",\"echo \\\"hi\\\"\"],[(\"out\",\"{OUT}\")])"
        );
        let outs = derivation_outputs(&text).unwrap();
        let got: Vec<(&str, Option<String>)> = outs
            .iter()
            .map(|o| (o.name.as_str(), o.path.as_ref().map(|p| p.to_string())))
            .collect();
        assert_eq!(
            got,
            vec![
                ("dev", Some(DEV.to_owned())),
                ("out", Some(OUT.to_owned())),
                ("ca", None)
            ]
        );
    }

    #[test]
    fn malformed_text_is_an_error_not_a_guess() {
        for bad in [
            "",
            "Derive(",
            "Derive([(\"out\",\"/tmp/x\",\"\",\"\")])",
            "Derive([(\"out\",\"unterminated",
            "{\"json\": true}",
        ] {
            assert!(derivation_outputs(bad).is_err(), "{bad:?}");
        }
        assert_eq!(derivation_outputs("Derive([],[],").unwrap(), vec![]);
    }

    proptest! {
        #[test]
        fn never_panics(s in "\\PC{0,200}") {
            let _ = derivation_outputs(&s);
            let _ = derivation_outputs(&format!("Derive([(\"{s}"));
        }
    }
}
