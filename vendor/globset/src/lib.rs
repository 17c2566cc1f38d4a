//! The part of `globset` that `tough` uses, without a regex engine.
//!
//! tough compiles the `paths` patterns of TUF delegations with `globset::Glob::new(p)
//! .compile_matcher()` and asks `is_match(target_name)`. That one use pulled globset's regex
//! engine and its tables (about 0.6 MB) into the drone's agent, whose static binary has a 10 MiB
//! budget. TUF's PATHPATTERN needs far less: `*` (any run of characters but `/`), `?` (one
//! character but `/`), `[…]`/`[!…]` classes with ranges, and `\` escapes; everything else is
//! literal. A pattern this matcher cannot read is an error, as with globset: tough then refuses
//! the metadata instead of guessing who owns a target.
//!
//! The workspace patches crates.io's `globset` with this crate (`[patch.crates-io]`); nothing
//! else in the workspace uses globset.

use std::fmt;
use std::path::Path;

/// A pattern that is not a glob this matcher reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    glob: String,
    reason: &'static str,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "error parsing glob '{}': {}", self.glob, self.reason)
    }
}

impl std::error::Error for Error {}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Literal(char),
    /// `?`: one character, not `/`.
    Any,
    /// `*`: any run of characters without `/`.
    Star,
    /// `[...]`: ranges (inclusive), negated with `!` or `^`.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
}

/// A parsed glob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glob {
    glob: String,
    tokens: Vec<Token>,
}

/// A glob ready to match paths.
#[derive(Debug, Clone)]
pub struct GlobMatcher {
    glob: Glob,
}

impl Glob {
    /// Parses `glob`.
    pub fn new(glob: &str) -> Result<Glob, Error> {
        let err = |reason| Error {
            glob: glob.to_owned(),
            reason,
        };
        let mut tokens = Vec::new();
        let mut chars = glob.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '*' => tokens.push(Token::Star),
                '?' => tokens.push(Token::Any),
                '\\' => tokens.push(Token::Literal(chars.next().ok_or(err("dangling '\\'"))?)),
                '[' => {
                    let negated = matches!(chars.peek(), Some('!' | '^'));
                    if negated {
                        chars.next();
                    }
                    let mut ranges = Vec::new();
                    let mut first = true;
                    loop {
                        let c = chars.next().ok_or(err("unclosed character class; missing ']'"))?;
                        if c == ']' && !first {
                            break;
                        }
                        first = false;
                        let lo = if c == '\\' {
                            chars.next().ok_or(err("dangling '\\'"))?
                        } else {
                            c
                        };
                        let mut ahead = chars.clone();
                        if ahead.next() == Some('-') && ahead.peek().is_some_and(|&n| n != ']') {
                            chars.next();
                            let hi = chars.next().ok_or(err("unclosed character class; missing ']'"))?;
                            if hi < lo {
                                return Err(err("invalid range; the end is before the start"));
                            }
                            ranges.push((lo, hi));
                        } else {
                            ranges.push((lo, lo));
                        }
                    }
                    tokens.push(Token::Class { negated, ranges });
                }
                c => tokens.push(Token::Literal(c)),
            }
        }
        Ok(Glob {
            glob: glob.to_owned(),
            tokens,
        })
    }

    /// The matcher of this glob.
    pub fn compile_matcher(&self) -> GlobMatcher {
        GlobMatcher { glob: self.clone() }
    }

    /// The pattern as given.
    pub fn glob(&self) -> &str {
        &self.glob
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.glob)
    }
}

fn matches(tokens: &[Token], text: &[char]) -> bool {
    match tokens.split_first() {
        None => text.is_empty(),
        Some((Token::Star, rest)) => {
            // Every split up to the next '/', shortest first.
            for i in 0..=text.len() {
                if matches(rest, &text[i..]) {
                    return true;
                }
                if text.get(i) == Some(&'/') {
                    break;
                }
            }
            false
        }
        Some((t, rest)) => {
            let Some((&c, tail)) = text.split_first() else {
                return false;
            };
            let one = match t {
                Token::Literal(l) => *l == c,
                Token::Any => c != '/',
                Token::Class { negated, ranges } => {
                    c != '/' && ranges.iter().any(|&(lo, hi)| lo <= c && c <= hi) != *negated
                }
                Token::Star => unreachable!("handled above"),
            };
            one && matches(rest, tail)
        }
    }
}

impl GlobMatcher {
    /// True when the whole of `path` matches.
    pub fn is_match<P: AsRef<Path>>(&self, path: P) -> bool {
        let text: Vec<char> = path.as_ref().to_string_lossy().chars().collect();
        matches(&self.glob.tokens, &text)
    }

    /// The glob this matcher was compiled from.
    pub fn glob(&self) -> &Glob {
        &self.glob
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(glob: &str, path: &str) -> bool {
        Glob::new(glob).unwrap().compile_matcher().is_match(path)
    }

    #[test]
    fn tuf_path_patterns() {
        // The examples of tough's PathPattern and the TUF specification.
        assert!(m("foo-version-?.tgz", "foo-version-2.tgz"));
        assert!(m("foo-version-?.tgz", "foo-version-a.tgz"));
        assert!(!m("foo-version-?.tgz", "foo-version-alpha.tgz"));
        assert!(m("*.tgz", "foo.tgz"));
        assert!(!m("*.tgz", "targets/foo.tgz"));
        assert!(m("targets/*.tgz", "targets/foo.tgz"));
        assert!(m("foo.tgz", "foo.tgz"));
        assert!(!m("foo.tgz", "foo.tgzx"));
        assert!(m("*", "fw-1.4.0.fnb"));
        assert!(m("fw-[0-9].*", "fw-1.4.0.fnb"));
        assert!(!m("fw-[!0-9]*", "fw-1.4.0.fnb"));
        assert!(m("a\\*b", "a*b"));
        assert!(!m("a\\*b", "axb"));
    }

    #[test]
    fn unreadable_patterns_are_errors() {
        assert!(Glob::new("fw-[0-9").is_err());
        assert!(Glob::new("fw-[9-0]").is_err());
        assert!(Glob::new("fw\\").is_err());
    }
}
