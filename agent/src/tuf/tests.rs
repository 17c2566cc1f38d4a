//! tough's errors map to the code of the check that failed; target checks refuse what differs.

use super::*;
use std::backtrace::Backtrace;
use tough::error::Error as T;

fn url() -> Url {
    Url::parse("https://repo.example/metadata/").unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn tough_errors_map_to_the_check_that_failed() {
    let cases: Vec<(T, ErrorCode)> = vec![
        (
            T::OlderMetadata {
                role: RoleType::Snapshot,
                current_version: 3,
                new_version: 2,
                backtrace: Backtrace::disabled(),
            },
            ErrorCode::TufRollback,
        ),
        (
            T::VersionMismatch {
                role: RoleType::Snapshot,
                fetched: 2,
                expected: 3,
                backtrace: Backtrace::disabled(),
            },
            ErrorCode::TufMixAndMatch,
        ),
        (
            T::HashMismatch {
                context: "snapshot.json".into(),
                calculated: "aa".into(),
                expected: "bb".into(),
                backtrace: Backtrace::disabled(),
            },
            ErrorCode::TufMixAndMatch,
        ),
        (
            T::MaxSizeExceeded {
                max_size: 10,
                specifier: "timestamp.json",
                backtrace: Backtrace::disabled(),
            },
            ErrorCode::TufMixAndMatch,
        ),
        (
            T::MaxSizeExceeded {
                max_size: 10,
                specifier: "max_timestamp_size argument",
                backtrace: Backtrace::disabled(),
            },
            ErrorCode::TufFetch,
        ),
        (
            T::MetaMissing {
                file: "targets.json",
                role: RoleType::Snapshot,
                backtrace: Backtrace::disabled(),
            },
            ErrorCode::TufMixAndMatch,
        ),
        (
            T::ExpiredMetadata {
                role: RoleType::Timestamp,
                backtrace: Backtrace::disabled(),
            },
            ErrorCode::TufExpired,
        ),
        (
            T::Transport {
                url: url(),
                source: tough::TransportError::new(tough::TransportErrorKind::Other, "x"),
                backtrace: Backtrace::disabled(),
            },
            ErrorCode::TufFetch,
        ),
        (T::NoTargets, ErrorCode::Internal),
    ];
    for (e, code) in cases {
        let mapped = TufError::from_tough(&e, &url());
        assert_eq!(mapped.code(), code, "{e} -> {mapped}");
        assert!(
            mapped.to_string().contains("https://repo.example/metadata/") || code == ErrorCode::Internal,
            "the message names the repository: {mapped}"
        );
    }
}

#[test]
fn a_bad_signature_maps_to_tuf_signature() {
    // A real signature failure from tough: a root whose only signature is garbage.
    let root = r#"{"signed":{"_type":"root","spec_version":"1.0.0","consistent_snapshot":false,
        "version":1,"expires":"2099-01-01T00:00:00Z",
        "keys":{"1a2b":{"keytype":"ed25519","scheme":"ed25519","keyval":{"public":"00"}}},
        "roles":{"root":{"keyids":["1a2b"],"threshold":1},"targets":{"keyids":["1a2b"],"threshold":1},
        "snapshot":{"keyids":["1a2b"],"threshold":1},"timestamp":{"keyids":["1a2b"],"threshold":1}}},
        "signatures":[{"keyid":"1a2b","sig":"00"}]}"#;
    let parsed: Result<tough::schema::Signed<tough::schema::Root>, _> = serde_json::from_str(root);
    // Either the key ids or the signature are refused; both are a signature failure.
    let err = match parsed {
        Ok(r) => r.signed.verify_role(&r).map_err(|e| T::VerifyTrustedMetadata {
            source: e,
            backtrace: Backtrace::disabled(),
        }),
        Err(e) => Err(T::ParseTrustedMetadata {
            source: e,
            backtrace: Backtrace::disabled(),
        }),
    };
    let Err(e) = err else {
        panic!("a garbage signature verified")
    };
    assert_eq!(TufError::from_tough(&e, &url()).code(), ErrorCode::TufSignature);
}

#[test]
fn target_checks_refuse_another_length_or_hash() {
    let t = TrustedTarget {
        name: "b.fnb".into(),
        source: "https://h.example/targets/b.fnb".into(),
        length: 3,
        sha256: vec![1; 32],
    };
    assert!(t.check(3, &[1; 32]).is_ok());
    let e = t.check(4, &[1; 32]).err();
    assert!(
        e.as_ref()
            .is_some_and(|e| e.code() == ErrorCode::TufTargetMismatch && e.to_string().contains("length")),
        "{e:?}"
    );
    let e = t.check(3, &[2; 32]).err();
    assert!(
        e.as_ref()
            .is_some_and(|e| e.code() == ErrorCode::TufTargetMismatch && e.to_string().contains("sha256")),
        "{e:?}"
    );
}

#[test]
fn the_target_name_is_the_last_path_segment() {
    assert_eq!(target_name("https://h.example/targets/fw-2.0.fnb"), "fw-2.0.fnb");
    assert_eq!(target_name("https://h.example/t/fw.fnb?sig=x#y"), "fw.fnb");
    assert_eq!(target_name("/data/fw.fnb"), "fw.fnb");
    assert_eq!(target_name("fw.fnb"), "fw.fnb");
}
