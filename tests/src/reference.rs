//! The reference pages (`docs/src/reference/*.md`) as the tests that keep them true read them.
//!
//! The pages are plain Markdown with a few conventions, so a test can compare them with the code
//! without a Markdown parser:
//!
//! - one heading per config section, command, resource or group, so anchors stay stable;
//! - what a page documents (a key, a field path, a code, a metric) is the first cell of a table
//!   row, as one code span: `` | `spec.firmware.version` | string | … | ``;
//! - flags are written out in full (`--data-dir`) in the section of the command they belong to.
//!
//! [`Page::sections`] splits a page by headings, [`Section::table_keys`] reads the first cells,
//! [`Section::long_flags`] the flags, and [`assert_same`] compares a page with the code both ways
//! with a message that says what is missing where.

use std::collections::BTreeSet;
use std::fmt::Write as _;

/// One reference page.
#[derive(Debug, Clone)]
pub struct Page {
    /// Where it is, relative to the workspace root (for messages).
    pub path: String,
    /// Its text.
    pub text: String,
}

/// A heading and the text under it, up to the next heading of the same or a higher level.
#[derive(Debug, Clone)]
pub struct Section {
    /// 2 for `##`, 3 for `###`, …
    pub level: usize,
    /// The heading's text, without the `#`s and without backticks.
    pub heading: String,
    /// The lines under the heading, nested headings included.
    pub body: String,
    /// Line number of the heading (1-based), for messages.
    pub line: usize,
}

use crate::release::workspace_root;

impl Page {
    /// `docs/src/reference/NAME.md`.
    ///
    /// # Panics
    /// When the page cannot be read: the message names it.
    pub fn reference(name: &str) -> Page {
        let path = format!("docs/src/reference/{name}.md");
        let text = std::fs::read_to_string(workspace_root().join(&path))
            .unwrap_or_else(|e| panic!("cannot read the reference page {path}: {e}"));
        Page { path, text }
    }

    /// The sections of heading level `level` (code fences are skipped: a `# comment` in a shell
    /// block is no heading).
    pub fn sections(&self, level: usize) -> Vec<Section> {
        let mut out = Vec::new();
        let mut open: Option<Section> = None;
        let mut fenced = false;
        for (i, line) in self.text.lines().enumerate() {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
            }
            let hashes = line.bytes().take_while(|b| *b == b'#').count();
            if !fenced && hashes > 0 && hashes <= level && line[hashes..].starts_with(' ') {
                out.extend(open.take());
                if hashes == level {
                    open = Some(Section {
                        level,
                        heading: line[hashes..].trim().replace('`', ""),
                        body: String::new(),
                        line: i + 1,
                    });
                }
            } else if let Some(section) = open.as_mut() {
                section.body.push_str(line);
                section.body.push('\n');
            }
        }
        out.extend(open);
        out
    }

    /// The section of level `level` whose heading is `heading`.
    ///
    /// # Panics
    /// When there is none: the message lists the headings there are.
    pub fn section(&self, level: usize, heading: &str) -> Section {
        let sections = self.sections(level);
        let headings: Vec<&str> = sections.iter().map(|s| s.heading.as_str()).collect();
        sections
            .iter()
            .find(|s| s.heading == heading)
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "{} has no {} heading `{heading}`; it has {headings:?}",
                    self.path,
                    "#".repeat(level)
                )
            })
    }

    /// The first cells of every table row of the whole page (see [`Section::table_keys`]).
    pub fn table_keys(&self) -> Vec<String> {
        table_keys(&self.text)
    }
}

impl Section {
    /// The first cells of the table rows under this heading that are a single code span,
    /// without the backticks (header rows and separators are not).
    pub fn table_keys(&self) -> Vec<String> {
        table_keys(&self.body)
    }

    /// The table rows under this heading whose first cell is a single code span: every cell,
    /// trimmed, the first one without its backticks.
    pub fn table_rows(&self) -> Vec<Vec<String>> {
        table_rows(&self.body)
    }

    /// Every `--long-flag` written in this section (code blocks included: a usage example is
    /// a claim about the flags too).
    pub fn long_flags(&self) -> BTreeSet<String> {
        long_flags(&self.body)
    }

    /// Where this section is, for messages: `PATH:LINE (## heading)`.
    pub fn at(&self, page: &Page) -> String {
        format!(
            "{}:{} ({} {})",
            page.path,
            self.line,
            "#".repeat(self.level),
            self.heading
        )
    }
}

fn table_keys(text: &str) -> Vec<String> {
    table_rows(text)
        .into_iter()
        .map(|mut row| row.swap_remove(0))
        .collect()
}

fn table_rows(text: &str) -> Vec<Vec<String>> {
    let mut fenced = false;
    let mut out = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
        }
        let Some(row) = line.trim().strip_prefix('|').filter(|_| !fenced) else {
            continue;
        };
        let mut cells: Vec<String> = row
            .trim_end()
            .trim_end_matches('|')
            .split('|')
            .map(|c| c.trim().to_owned())
            .collect();
        let key = cells[0]
            .strip_prefix('`')
            .and_then(|f| f.strip_suffix('`'))
            .filter(|inner| !inner.is_empty() && !inner.contains('`'))
            .map(str::to_owned);
        if let Some(key) = key {
            cells[0] = key;
            out.push(cells);
        }
    }
    out
}

/// Every `--long-flag` in `text`: two dashes, a lower-case letter, then letters, digits and dashes.
pub fn long_flags(text: &str) -> BTreeSet<String> {
    let bytes = text.as_bytes();
    let mut out = BTreeSet::new();
    let mut from = 0;
    while let Some(at) = text.get(from..).and_then(|t| t.find("--")).map(|p| p + from) {
        let name_len = text[at + 2..]
            .bytes()
            .take_while(|b| b.is_ascii_alphanumeric() || *b == b'-')
            .count();
        let name = &text[at + 2..at + 2 + name_len];
        let starts_a_word = at == 0 || !(bytes[at - 1].is_ascii_alphanumeric() || bytes[at - 1] == b'-');
        if starts_a_word && name.starts_with(|c: char| c.is_ascii_lowercase()) {
            out.insert(format!("--{}", name.trim_end_matches('-')));
        }
        from = at + 2 + name_len;
    }
    out
}

/// Compares what the code has with what a page documents, both ways, and panics with the lists
/// of what is missing: `code_side` names where the first set comes from (e.g. "the config
/// parser"), `page_side` where the second one was read (e.g. a [`Section::at`]).
///
/// # Panics
/// When the sets differ.
pub fn assert_same(
    what: &str,
    code: &BTreeSet<String>,
    code_side: &str,
    page: &BTreeSet<String>,
    page_side: &str,
) {
    let undocumented: Vec<&String> = code.difference(page).collect();
    let unknown: Vec<&String> = page.difference(code).collect();
    if undocumented.is_empty() && unknown.is_empty() {
        return;
    }
    let mut msg = String::new();
    if !undocumented.is_empty() {
        let _ = writeln!(
            msg,
            "{what} that {code_side} has but {page_side} does not document: {undocumented:?}"
        );
    }
    if !unknown.is_empty() {
        let _ = writeln!(
            msg,
            "{what} that {page_side} documents but {code_side} does not have: {unknown:?}"
        );
    }
    panic!("{msg}");
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# Title\n\nintro `--not-a-section`\n\n## `[a]`\n\n| key | type |\n|---|---|\n| `x` | string |\n| `y.z` | bool |\n\n### sub\n\n`--flag-one` and --two, not ---three or a--b\n\n```sh\n# not a heading\ncmd --in-code\n```\n\n## b\n\n| `w` | int |\n";

    fn page() -> Page {
        Page {
            path: "p.md".into(),
            text: PAGE.into(),
        }
    }

    #[test]
    fn sections_split_at_their_level_and_nest_the_lower_ones() {
        let two = page().sections(2);
        let headings: Vec<&str> = two.iter().map(|s| s.heading.as_str()).collect();
        assert_eq!(headings, ["[a]", "b"]);
        assert_eq!(two[0].table_keys(), ["x", "y.z"]);
        assert!(two[0].body.contains("### sub"), "{}", two[0].body);
        assert_eq!(two[1].table_keys(), ["w"]);
        assert_eq!(page().section(3, "sub").line, 12);
    }

    #[test]
    fn long_flags_are_whole_flags_only() {
        let flags = page().section(3, "sub").long_flags();
        let want: BTreeSet<String> = ["--flag-one", "--two", "--in-code"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(flags, want);
    }

    #[test]
    #[should_panic(expected = "does not document: [\"b\"]")]
    fn assert_same_names_what_is_missing() {
        let code: BTreeSet<String> = ["a", "b"].into_iter().map(String::from).collect();
        let page: BTreeSet<String> = ["a"].into_iter().map(String::from).collect();
        assert_same("keys", &code, "the code", &page, "the page");
    }
}

/// One command of a clap binary as its `-h` output describes it.
#[derive(Debug, Clone, Default)]
pub struct HelpCommand {
    /// `flightnode-hub rollout status`.
    pub path: String,
    /// Its subcommands (without clap's `help`).
    pub subcommands: Vec<String>,
    /// Its long flags (without `--help` and `--version`), globals included.
    pub flags: BTreeSet<String>,
    /// Its positional arguments, e.g. `SOURCE`.
    pub arguments: Vec<String>,
    /// The environment variables its flags read.
    pub env: BTreeSet<String>,
}

/// Every command of `binary`, found by running `-h` on it and, recursively, on each subcommand.
/// `name` is the binary's name as the page writes it.
///
/// # Panics
/// When the binary cannot run or its help does not succeed.
pub fn help_tree(binary: &std::path::Path, name: &str) -> Vec<HelpCommand> {
    let mut out = Vec::new();
    let mut todo = vec![Vec::<String>::new()];
    while let Some(args) = todo.pop() {
        let mut cmd = std::process::Command::new(binary);
        cmd.args(&args).arg("-h");
        // The help shows `[env: NAME=value]` for a variable that is set.
        for (var, _) in std::env::vars_os() {
            if var.to_string_lossy().starts_with("FLIGHTNODE_") || var == "POD_NAME" {
                cmd.env_remove(var);
            }
        }
        let output = cmd
            .output()
            .unwrap_or_else(|e| panic!("running {} {args:?} -h: {e}", binary.display()));
        let text = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "{} {args:?} -h failed: {}",
            binary.display(),
            String::from_utf8_lossy(&output.stderr)
        );
        let mut parsed = parse_help(&text);
        parsed.path = std::iter::once(name.to_owned())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ");
        for sub in &parsed.subcommands {
            todo.push(args.iter().cloned().chain([sub.clone()]).collect());
        }
        out.push(parsed);
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out
}

/// Reads clap's short help (`-h`): one line per command, option and argument.
fn parse_help(text: &str) -> HelpCommand {
    let mut out = HelpCommand::default();
    let mut block = "";
    for line in text.lines() {
        if !line.starts_with(' ') {
            block = line.trim_end();
            continue;
        }
        let item = line.trim_start();
        let first = item.split_whitespace().next().unwrap_or_default();
        match block {
            "Commands:" if first != "help" => out.subcommands.push(first.to_owned()),
            "Arguments:" => out.arguments.push(
                first
                    .trim_matches(|c| matches!(c, '<' | '>' | '[' | ']' | '.'))
                    .to_owned(),
            ),
            // A flag's own line is indented at most 6 columns; with long flags clap puts the
            // description (and its `[env: …]`) on the next line, indented further.
            "Options:" => {
                let indent = line.len() - item.len();
                let flag = item
                    .split_whitespace()
                    .map(|t| t.trim_end_matches(',').trim_end_matches("..."))
                    .find(|t| t.starts_with("--"))
                    .filter(|_| indent <= 6 && item.starts_with('-'))
                    .map(|t| t.split(['[', '=']).next().unwrap_or(t).to_owned());
                if let Some(flag) = flag.filter(|f| f != "--help" && f != "--version") {
                    out.flags.insert(flag);
                }
                if let Some((_, rest)) = item.split_once("[env: ") {
                    out.env
                        .insert(rest.split(['=', ']']).next().unwrap_or_default().to_owned());
                }
            }
            _ => {}
        }
    }
    out
}

impl Section {
    /// The text under this heading before the next heading of any level.
    pub fn own_body(&self) -> String {
        let mut fenced = false;
        let mut out = String::new();
        for line in self.body.lines() {
            if line.trim_start().starts_with("```") {
                fenced = !fenced;
            }
            if !fenced && line.starts_with('#') && line.trim_start_matches('#').starts_with(' ') {
                break;
            }
            out.push_str(line);
            out.push('\n');
        }
        out
    }
}

/// Checks the CLI reference against `binary`'s help: a `## NAME` heading for the binary and
/// a `### NAME SUB …` heading for every subcommand; under each, every long flag, positional
/// argument and environment variable of that command (flags global to the binary under the
/// binary's heading), and no flag the command does not have.
///
/// # Panics
/// When the page and the help differ: every difference is listed, with the heading it concerns.
pub fn assert_cli_page(page: &Page, binary: &std::path::Path, name: &str) {
    let tree = help_tree(binary, name);
    let root = tree
        .iter()
        .find(|c| c.path == name)
        .cloned()
        .expect("the tree has the root");
    let mut problems = Vec::new();

    let mut headings: Vec<Section> = page
        .sections(2)
        .into_iter()
        .filter(|s| s.heading == name)
        .collect();
    headings.extend(
        page.sections(3)
            .into_iter()
            .filter(|s| s.heading.starts_with(&format!("{name} "))),
    );
    for s in &headings {
        if !tree.iter().any(|c| c.path == s.heading) {
            problems.push(format!(
                "{} is about a command `{name} -h` does not list",
                s.at(page)
            ));
        }
    }
    for cmd in &tree {
        let Some(section) = headings.iter().find(|s| s.heading == cmd.path) else {
            let hashes = if cmd.path == name { "##" } else { "###" };
            problems.push(format!("{} has no heading `{hashes} {}`", page.path, cmd.path));
            continue;
        };
        let own = section.own_body();
        let written = long_flags(&own);
        let (expected, env): (BTreeSet<String>, BTreeSet<String>) = if cmd.path == name {
            (cmd.flags.clone(), cmd.env.clone())
        } else {
            (
                cmd.flags.difference(&root.flags).cloned().collect(),
                cmd.env.difference(&root.env).cloned().collect(),
            )
        };
        let missing: Vec<&String> = expected.difference(&written).collect();
        if !missing.is_empty() {
            problems.push(format!("{} does not document {missing:?}", section.at(page)));
        }
        let allowed: BTreeSet<String> = cmd
            .flags
            .iter()
            .cloned()
            .chain(["--help".to_owned(), "--version".to_owned()])
            .collect();
        let unknown: Vec<&String> = written.difference(&allowed).collect();
        if !unknown.is_empty() {
            problems.push(format!(
                "{} names {unknown:?}, which `{} -h` does not have",
                section.at(page),
                cmd.path
            ));
        }
        for word in cmd.arguments.iter().chain(&env) {
            if !own.contains(word.as_str()) {
                problems.push(format!("{} does not mention `{word}`", section.at(page)));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "the CLI reference and `{name} -h` differ:\n{}",
        problems.join("\n")
    );
}
