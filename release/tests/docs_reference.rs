//! `docs/src/reference/cli.md` against the release tool's `-h`: every command has its heading,
//! every flag and argument is documented, and none is named that the tool does not have.

use flightnode_tests::reference::{Page, assert_cli_page};

#[test]
fn cli_reference_matches_the_release_tools_help() {
    assert_cli_page(
        &Page::reference("cli"),
        std::path::Path::new(env!("CARGO_BIN_EXE_flightnode-release")),
        "flightnode-release",
    );
}
