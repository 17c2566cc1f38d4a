//! rustls only: no OpenSSL, aws-lc or native-tls anywhere in the dependency tree, for any target.

#[test]
fn no_openssl_or_aws_lc_in_the_tree() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    for krate in ["openssl-sys", "aws-lc-sys", "native-tls"] {
        let out = std::process::Command::new(&cargo)
            .current_dir(root)
            .args(["tree", "--workspace", "--target", "all", "-i", krate])
            .output()
            .expect("run cargo tree");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("did not match any packages"),
            "{krate} is in the dependency tree:\n{}{stderr}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
}
