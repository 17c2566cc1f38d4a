//! The book under `docs/`: it builds with mdBook without an error or a warning, every page is in
//! its `SUMMARY.md`, and every relative link of the book and of the README leads to a file and
//! heading that exist. The anchors the link checker computes are compared with the ids mdBook
//! gives the headings, so its rule cannot drift from the tool's.

use flightnode_tests::docs;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn book_src() -> PathBuf {
    docs::workspace_root().join("docs/src")
}

/// The pages of the book, `SUMMARY.md` left out.
fn pages() -> Vec<PathBuf> {
    docs::markdown_files(&book_src())
        .unwrap()
        .into_iter()
        .filter(|p| !p.ends_with("SUMMARY.md"))
        .collect()
}

/// The ids mdBook gave the headings of one rendered page.
fn heading_ids(html: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = html;
    while let Some(at) = rest.find("<h") {
        rest = &rest[at + 2..];
        let level = rest.chars().next().is_some_and(|c| ('1'..='6').contains(&c));
        if level && let Some(id) = rest[1..].strip_prefix(" id=\"") {
            out.insert(id[..id.find('"').unwrap_or(id.len())].to_owned());
        }
    }
    out
}

#[test]
fn the_book_builds_without_warnings_and_mdbook_gives_the_anchors_the_checker_expects() {
    let Some(mdbook) = docs::require_mdbook() else {
        return;
    };
    let dest = Path::new(env!("CARGO_TARGET_TMPDIR")).join("book");
    // Stale pages from an earlier build must not stand in for missing ones.
    if dest.exists() {
        std::fs::remove_dir_all(&dest).unwrap();
    }
    let out = Command::new(&mdbook)
        .arg("build")
        .arg(docs::workspace_root().join("docs"))
        .arg("--dest-dir")
        .arg(&dest)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "mdbook build failed ({}):\n{log}",
        out.status
    );
    let complaints: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    assert!(
        complaints.is_empty(),
        "mdbook build complained:\n{}",
        complaints.join("\n")
    );

    for page in pages() {
        let rel = page.strip_prefix(book_src()).unwrap();
        let html_path = dest.join(rel).with_extension("html");
        let html = std::fs::read_to_string(&html_path)
            .unwrap_or_else(|e| panic!("{} was not rendered: {e}", html_path.display()));
        let expected = docs::anchors(&std::fs::read_to_string(&page).unwrap());
        assert_eq!(
            heading_ids(&html),
            expected,
            "the anchors mdBook gave the headings of {} differ from what the link checker computes",
            rel.display()
        );
    }
}

#[test]
fn every_page_is_in_the_summary() {
    let src = book_src();
    let summary = std::fs::read_to_string(src.join("SUMMARY.md")).unwrap();
    let listed: BTreeSet<PathBuf> = docs::links(&summary)
        .into_iter()
        .map(|l| docs::normalize(&src.join(l.target)))
        .collect();
    let unlisted: Vec<String> = pages()
        .into_iter()
        .filter(|p| !listed.contains(p))
        .map(|p| p.display().to_string())
        .collect();
    assert!(
        unlisted.is_empty(),
        "pages the book does not render (not in docs/src/SUMMARY.md): {unlisted:?}"
    );
}

#[test]
fn every_relative_link_of_the_book_and_the_readme_resolves() {
    let mut files = docs::markdown_files(&book_src()).unwrap();
    files.push(docs::workspace_root().join("README.md"));
    let problems = docs::check(&files, &book_src()).unwrap();
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// The checker itself, on pages made here: each kind of broken link is caught, and what is not
// a link (code) is left alone.
#[test]
fn checker_slugs_follow_github_and_mdbook() {
    assert_eq!(docs::slug("Packages and releases"), "packages-and-releases");
    assert_eq!(
        docs::slug("Chunked bundles (format 2): download only what changed"),
        "chunked-bundles-format-2-download-only-what-changed"
    );
    assert_eq!(
        docs::slug("Installing firmware: spec.firmware"),
        "installing-firmware-specfirmware"
    );
    assert_eq!(
        docs::slug("Overlapping rollouts: the older one yields"),
        "overlapping-rollouts-the-older-one-yields"
    );
    assert_eq!(docs::slug("boot_backends and A/B"), "boot_backends-and-ab");
}

#[test]
fn checker_numbers_repeated_headings_and_ignores_code() {
    let page = "# Title\n\n## Setup\n\n```toml\n# not a heading\n```\n\n## Setup\n\n## `spec.firmware` [link](x.md)\n\n### Custom {#mine}\n\n`# code` first is prose\n";
    let got = docs::anchors(page);
    let want: BTreeSet<String> = ["title", "setup", "setup-1", "specfirmware-link", "mine"]
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(got, want);
}

#[test]
fn checker_finds_links_outside_code_only() {
    let page = "See [a](a.md#x) and ![img](i.png \"title\").\n`[no](code.md)` ``[nor](this.md)``\n```\n[fenced](f.md)\n```\n[ref]: r.md\n<https://example.org/x>\n";
    let got: Vec<(usize, String)> = docs::links(page)
        .into_iter()
        .map(|l| (l.line, l.target))
        .collect();
    assert_eq!(
        got,
        [
            (1, "a.md#x".to_owned()),
            (1, "i.png".to_owned()),
            (6, "r.md".to_owned()),
            (7, "https://example.org/x".to_owned()),
        ]
    );
}

#[test]
fn checker_reports_broken_links() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src");
    std::fs::create_dir_all(src.join("guide")).unwrap();
    std::fs::write(dir.path().join("outside.md"), "# Outside\n").unwrap();
    std::fs::write(src.join("guide/b.md"), "# B\n\n## There\n").unwrap();
    let a = src.join("a.md");
    std::fs::write(
        &a,
        "# A\n\n\
         [fine](guide/b.md#there) [self](#a) [web](https://example.org/page)\n\
         [gone](missing.md)\n\
         [no anchor](guide/b.md#nowhere)\n\
         [own anchor](#nope)\n\
         [escapes](../outside.md)\n\
         [absolute](/etc/passwd)\n\
         [bad url](https:///nohost)\n\
         `[in code](missing-too.md)`\n",
    )
    .unwrap();
    let problems = docs::check(std::slice::from_ref(&a), &src).unwrap();
    let got: Vec<(usize, &str)> = problems.iter().map(|p| (p.line, p.target.as_str())).collect();
    assert_eq!(
        got,
        [
            (4, "missing.md"),
            (5, "guide/b.md#nowhere"),
            (6, "#nope"),
            (7, "../outside.md"),
            (8, "/etc/passwd"),
            (9, "https:///nohost"),
        ],
        "{problems:#?}"
    );
    assert!(
        problems[1]
            .to_string()
            .contains("no heading with the anchor `nowhere`")
    );
    // The same link is fine from a page outside the book (the README).
    let readme = dir.path().join("README.md");
    std::fs::write(&readme, "[book page](src/guide/b.md#there) [other](outside.md)\n").unwrap();
    assert_eq!(docs::check(&[readme], &src).unwrap(), []);
}
