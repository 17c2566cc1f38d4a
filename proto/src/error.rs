//! How every flightnode error reads: a message that says what failed on which file, device or
//! URL, and its cause as a `#[source]`, never repeated inside the message (the thiserror and
//! anyhow convention). [`Chain`] and [`chain`] print the message with its causes, as anyhow's
//! `{:#}` does, for the places that turn an error into text: reports, status messages, logs.

use std::error::Error;
use std::fmt;

/// Displays an error and its causes joined by `": "`. A cause whose text the message already
/// contains is skipped (errors of other crates may still embed their source).
pub struct Chain<'a>(pub &'a (dyn Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut text = self.0.to_string();
        let mut cause = self.0.source();
        while let Some(e) = cause {
            let more = e.to_string();
            if !more.is_empty() && !text.contains(&more) {
                text.push_str(": ");
                text.push_str(&more);
            }
            cause = e.source();
        }
        f.write_str(&text)
    }
}

/// `e` with its causes, as one line of text.
pub fn chain(e: &(dyn Error + 'static)) -> String {
    Chain(e).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot open bundle {path}")]
    struct Open {
        path: &'static str,
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("install failed")]
    struct Install(#[source] Open);

    #[test]
    fn each_cause_is_said_once_in_order() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let e = Install(Open {
            path: "/b.fnb",
            source: io,
        });
        assert_eq!(
            chain(&e),
            "install failed: cannot open bundle /b.fnb: no such file"
        );
        let plain = std::io::Error::other("disk full");
        assert_eq!(chain(&plain), "disk full");
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        #[derive(Debug, thiserror::Error)]
        #[error("reading failed: {source}")]
        struct Embeds {
            source: std::io::Error,
        }
        let e = Embeds {
            source: std::io::Error::other("timed out"),
        };
        assert_eq!(chain(&e), "reading failed: timed out");
    }
}
