//! The book under `docs/`: finding mdBook to build it, and a link checker for its pages and the
//! README.
//!
//! The checker follows what a reader clicks: a relative link must name a file that exists, an
//! `#anchor` must name a heading of that page (GitHub's and mdBook's rule: lower case, spaces to
//! `-`, punctuation other than `-` and `_` dropped, `-1`, `-2`… for repeated headings), and a
//! link from a book page must stay inside the book's `src/`, since nothing outside it is part of
//! the rendered book. External `http(s)` links are only checked for their form: the tests run
//! without a network.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// The mdBook binary to use; `./test.sh` points it at the pinned one in `target/mdbook-venv`.
pub const MDBOOK_ENV: &str = "FLIGHTNODE_MDBOOK";
/// Set to `1` to let the book build pass without running when no mdBook is found.
/// CI never sets it: there, a missing mdBook fails the test.
pub const SKIP_ENV: &str = "FLIGHTNODE_SKIP_MDBOOK";

pub use crate::release::workspace_root;

/// `$FLIGHTNODE_MDBOOK`, else `mdbook` on `PATH`, checked by running `--version`; `None` when
/// there is none and [`SKIP_ENV`]`=1`.
///
/// # Panics
/// When no mdBook runs and the skip variable is not set.
pub fn require_mdbook() -> Option<PathBuf> {
    match find_mdbook() {
        Ok(path) => Some(path),
        Err(why) if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") => {
            eprintln!("skipping the book build ({SKIP_ENV}=1): {why}");
            None
        }
        Err(why) => panic!(
            "the book build needs mdBook: {why}. Run ./test.sh (it installs the pinned one into \
             target/mdbook-venv and sets {MDBOOK_ENV}), or set {SKIP_ENV}=1 to skip it knowingly"
        ),
    }
}

fn find_mdbook() -> Result<PathBuf, String> {
    let candidate = match std::env::var_os(MDBOOK_ENV) {
        Some(path) => PathBuf::from(path),
        None => std::env::var_os("PATH")
            .and_then(|paths| {
                std::env::split_paths(&paths)
                    .map(|dir| dir.join("mdbook"))
                    .find(|p| p.is_file())
            })
            .ok_or_else(|| format!("{MDBOOK_ENV} is not set and there is no mdbook on PATH"))?,
    };
    match Command::new(&candidate).arg("--version").output() {
        Ok(out) if out.status.success() => {
            eprintln!(
                "book: {} ({})",
                String::from_utf8_lossy(&out.stdout).trim(),
                candidate.display()
            );
            Ok(candidate)
        }
        Ok(out) => Err(format!(
            "`{} --version` failed ({}): {}",
            candidate.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run {}: {e}", candidate.display())),
    }
}

/// One thing wrong with a link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The page the link is on.
    pub file: PathBuf,
    /// Its line (1-based).
    pub line: usize,
    /// The link as written.
    pub target: String,
    /// What is wrong.
    pub why: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}: link `{}`: {}",
            self.file.display(),
            self.line,
            self.target,
            self.why
        )
    }
}

/// A link found in a page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// Line (1-based).
    pub line: usize,
    /// The destination as written.
    pub target: String,
}

/// The lines of `markdown` that are prose: fenced code blocks blanked out, inline code spans
/// replaced by spaces (so `[x](y)` or `# not a heading` inside code count for nothing).
fn prose_lines(markdown: &str) -> Vec<String> {
    let mut fence: Option<String> = None;
    markdown
        .lines()
        .map(|line| {
            let trimmed = line.trim_start();
            if let Some(open) = &fence {
                if trimmed.starts_with(open.as_str())
                    && trimmed.trim_start_matches(open.as_str()).trim().is_empty()
                {
                    fence = None;
                }
                return String::new();
            }
            for marker in ['`', '~'] {
                let run: String = trimmed.chars().take_while(|c| *c == marker).collect();
                if run.len() >= 3 {
                    fence = Some(run);
                    return String::new();
                }
            }
            strip_code_spans(line)
        })
        .collect()
}

fn strip_code_spans(line: &str) -> String {
    let chars: Vec<char> = line.chars().collect();
    let mut out = String::with_capacity(line.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i] != '`' {
            out.push(chars[i]);
            i += 1;
            continue;
        }
        let run = chars[i..].iter().take_while(|c| **c == '`').count();
        // The span ends at the next run of exactly as many backticks; without one the
        // backticks are literal.
        let mut j = i + run;
        let mut close = None;
        while j < chars.len() {
            if chars[j] == '`' {
                let n = chars[j..].iter().take_while(|c| **c == '`').count();
                if n == run {
                    close = Some(j + n);
                    break;
                }
                j += n;
            } else {
                j += 1;
            }
        }
        if let Some(end) = close {
            // Keep the span's text for headings' anchors, without anything link-like.
            let inner: String = chars[i + run..end - run].iter().collect();
            out.push_str(&inner.replace(['[', ']', '(', ')'], " "));
            i = end;
        } else {
            out.extend(&chars[i..i + run]);
            i += run;
        }
    }
    out
}

/// Every link in `markdown`: inline links and images `[text](dest)`, reference definitions
/// `[label]: dest` and autolinks `<https://…>`, outside code.
pub fn links(markdown: &str) -> Vec<Link> {
    let mut out = Vec::new();
    for (n, line) in prose_lines(markdown).iter().enumerate() {
        let line_no = n + 1;
        let mut rest = line.as_str();
        while let Some(at) = rest.find("](") {
            let after = &rest[at + 2..];
            let target = if let Some(angled) = after.strip_prefix('<') {
                angled.split('>').next().unwrap_or("")
            } else {
                let end = after
                    .find(|c: char| c == ')' || c.is_whitespace())
                    .unwrap_or(after.len());
                &after[..end]
            };
            out.push(Link {
                line: line_no,
                target: target.to_owned(),
            });
            rest = after;
        }
        let trimmed = line.trim_start();
        if trimmed.starts_with('[')
            && let Some(close) = trimmed.find("]:")
            && !trimmed[..close].contains("](")
        {
            let target = trimmed[close + 2..].split_whitespace().next().unwrap_or("");
            out.push(Link {
                line: line_no,
                target: target.trim_matches(['<', '>']).to_owned(),
            });
        }
        let mut rest = line.as_str();
        while let Some(at) = rest.find("<http") {
            let after = &rest[at + 1..];
            let end = after.find('>').unwrap_or(after.len());
            out.push(Link {
                line: line_no,
                target: after[..end].to_owned(),
            });
            rest = &after[end..];
        }
    }
    out
}

/// The anchor GitHub and mdBook give a heading with this text.
pub fn slug(heading: &str) -> String {
    heading
        .chars()
        .filter_map(|c| {
            if c.is_alphanumeric() || c == '-' || c == '_' {
                Some(c.to_lowercase().collect::<String>())
            } else if c.is_whitespace() {
                Some("-".to_owned())
            } else {
                None
            }
        })
        .collect()
}

/// The text a heading renders to: link text without its destination, no emphasis markers.
fn heading_text(raw: &str) -> String {
    let mut out = String::new();
    let mut rest = raw;
    while let Some(open) = rest.find('[') {
        let Some(mid) = rest[open..].find("](").map(|m| open + m) else {
            break;
        };
        let Some(close) = rest[mid..].find(')').map(|c| mid + c) else {
            break;
        };
        out.push_str(&rest[..open]);
        out.push_str(&rest[open + 1..mid]);
        rest = &rest[close + 1..];
    }
    out.push_str(rest);
    out.replace(['*'], "")
}

/// Every anchor a page defines: its headings' (repeats numbered as GitHub and mdBook do), an
/// explicit `{#id}` on a heading, and `id="…"`/`name="…"` of inline HTML.
pub fn anchors(markdown: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for (raw, line) in markdown.lines().zip(prose_lines(markdown)) {
        // A heading starts with `#` as written: a line that starts with a code span holding
        // `# …` is prose.
        let trimmed = line.trim_start();
        let hashes = trimmed.chars().take_while(|c| *c == '#').count();
        let hashes = if raw.trim_start().starts_with('#') {
            hashes
        } else {
            0
        };
        if (1..=6).contains(&hashes)
            && trimmed[hashes..].starts_with([' ', '\t'])
            && line.len() - trimmed.len() < 4
        {
            let text = trimmed[hashes..].trim().trim_end_matches('#').trim_end();
            if let Some(start) = text.rfind("{#")
                && text.ends_with('}')
            {
                out.insert(text[start + 2..text.len() - 1].to_owned());
                continue;
            }
            let base = slug(&heading_text(text));
            let n = seen.entry(base.clone()).or_insert(0);
            out.insert(if *n == 0 {
                base.clone()
            } else {
                format!("{base}-{n}")
            });
            *n += 1;
        }
        for attr in ["id=\"", "name=\""] {
            let mut rest = line.as_str();
            while let Some(at) = rest.find(attr) {
                let after = &rest[at + attr.len()..];
                let end = after.find('"').unwrap_or(after.len());
                out.insert(after[..end].to_owned());
                rest = &after[end..];
            }
        }
    }
    out
}

/// `path` with `.` and `..` taken out, without touching the file system.
pub fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other),
        }
    }
    out
}

/// Whether an external link has the form `http(s)://host…` with nothing a browser would refuse.
fn external_link_ok(target: &str) -> bool {
    let Some(rest) = target
        .strip_prefix("https://")
        .or_else(|| target.strip_prefix("http://"))
    else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        && !target.chars().any(char::is_whitespace)
}

/// Checks every link of `pages` (read from disk). Links from pages under `book_src` must stay
/// inside it. Returns what is wrong, in page order.
///
/// # Errors
/// When a page or a linked page cannot be read.
pub fn check(pages: &[PathBuf], book_src: &Path) -> std::io::Result<Vec<Problem>> {
    let mut problems = Vec::new();
    let mut anchor_cache: BTreeMap<PathBuf, BTreeSet<String>> = BTreeMap::new();
    let book_src = normalize(book_src);
    for page in pages {
        let text = std::fs::read_to_string(page)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", page.display())))?;
        let dir = page.parent().unwrap_or(Path::new("."));
        let in_book = normalize(page).starts_with(&book_src);
        for link in links(&text) {
            let problem = |why: String| Problem {
                file: page.clone(),
                line: link.line,
                target: link.target.clone(),
                why,
            };
            let t = link.target.as_str();
            if t.is_empty() {
                problems.push(problem("empty destination".into()));
                continue;
            }
            if t.starts_with("http://") || t.starts_with("https://") {
                if !external_link_ok(t) {
                    problems.push(problem("not a well-formed http(s) URL".into()));
                }
                continue;
            }
            if t.starts_with("mailto:") {
                continue;
            }
            let (path_part, anchor) = match t.split_once('#') {
                Some((p, a)) => (p, Some(a)),
                None => (t, None),
            };
            if path_part.contains(':') {
                problems.push(problem("neither a relative link nor http(s)".into()));
                continue;
            }
            if path_part.starts_with('/') {
                problems.push(problem(
                    "an absolute path: links must be relative to the page".into(),
                ));
                continue;
            }
            let target_file = if path_part.is_empty() {
                page.clone()
            } else {
                normalize(&dir.join(path_part))
            };
            if in_book && !target_file.starts_with(&book_src) {
                problems.push(problem(format!(
                    "leaves the book's {}: the rendered book does not have it",
                    book_src.display()
                )));
                continue;
            }
            if !target_file.exists() {
                problems.push(problem(format!("{} does not exist", target_file.display())));
                continue;
            }
            let Some(anchor) = anchor else { continue };
            if target_file.extension().is_none_or(|e| e != "md") {
                problems.push(problem(format!(
                    "an anchor into {}, which is not a Markdown page",
                    target_file.display()
                )));
                continue;
            }
            if !anchor_cache.contains_key(&target_file) {
                let linked = std::fs::read_to_string(&target_file)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", target_file.display())))?;
                anchor_cache.insert(target_file.clone(), anchors(&linked));
            }
            if !anchor_cache[&target_file].contains(anchor) {
                problems.push(problem(format!(
                    "no heading with the anchor `{anchor}` in {}",
                    target_file.display()
                )));
            }
        }
    }
    Ok(problems)
}

/// Every `.md` file under `dir`, sorted.
///
/// # Errors
/// When a directory cannot be read.
pub fn markdown_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d)
            .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", d.display())))?
        {
            let path = entry?.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}
