//! The agent's parts of the reference: `docs/src/reference/cli.md` against the binary's `-h`, and
//! `docs/src/reference/error-codes.md` against the codes the agent can report.

use flightnode_agent::proto::ErrorCode;
use flightnode_agent::proto::mqtt::StatusError;
use flightnode_tests::reference::{Page, assert_cli_page, assert_same};
use std::collections::{BTreeMap, BTreeSet};

#[test]
fn cli_reference_matches_the_agents_help() {
    assert_cli_page(
        &Page::reference("cli"),
        std::path::Path::new(env!("CARGO_BIN_EXE_flightnode-agent")),
        "flightnode-agent",
    );
}

/// The variants of `ErrorCode` as its source declares them: `ErrorCode::ALL` is a list kept
/// by hand, so a variant added to the enum but not to it would escape the comparison below.
fn declared_variants() -> usize {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../proto/src/codes.rs");
    let source = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let body = source
        .split_once("pub enum ErrorCode {")
        .and_then(|(_, rest)| rest.split_once("\n}"))
        .map(|(body, _)| body)
        .expect("proto/src/codes.rs declares `pub enum ErrorCode {`");
    body.lines()
        .map(str::trim)
        .filter(|l| l.ends_with(',') && l.starts_with(|c: char| c.is_ascii_uppercase()))
        .count()
}

#[test]
fn error_code_reference_lists_every_code_the_agent_reports_with_its_result() {
    assert_eq!(
        declared_variants(),
        ErrorCode::ALL.len(),
        "ErrorCode::ALL in proto/src/codes.rs misses a variant of the enum"
    );
    // Every code an upgrade can end with, and the one a refused command gets in a report.
    let malformed = StatusError::malformed(String::new()).code;
    let mut code: BTreeMap<String, String> = ErrorCode::ALL
        .iter()
        .map(|c| (c.as_str().to_owned(), c.result().as_str().to_owned()))
        .collect();
    code.insert(malformed, "rejected".to_owned());
    for refusal in flightnode_agent::proto::codes::CommandRefusal::ALL {
        code.insert(refusal.as_str().to_owned(), "rejected".to_owned());
    }

    let page = Page::reference("error-codes");
    let rows = page.section(2, "Codes").table_rows();
    let documented: BTreeMap<String, String> = rows.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    assert_eq!(rows.len(), documented.len(), "{} lists a code twice", page.path);
    let code_keys: BTreeSet<String> = code.keys().cloned().collect();
    let page_keys: BTreeSet<String> = documented.keys().cloned().collect();
    assert_same(
        "error codes",
        &code_keys,
        "proto/src/codes.rs (ErrorCode, CommandRefusal, and `malformed`)",
        &page_keys,
        &page.path,
    );
    for (c, result) in &code {
        let cell = &documented[c];
        assert!(
            cell.starts_with(result.as_str()),
            "{}: `{c}` ends an upgrade as `{result}`, the page says `{cell}`",
            page.path
        );
    }
}
