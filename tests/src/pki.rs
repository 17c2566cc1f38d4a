//! A throwaway PKI for mutual-TLS tests (the broker's and the hub's): a CA made with rcgen, a
//! server certificate for `localhost`/`127.0.0.1`, and client certificates with CN = an identity
//! (device id, or `hub`), also expired ones and ones from an unrelated CA. Everything is written as
//! PEM files into a directory the caller owns.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// A client certificate and key (PEM files).
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// CN of the certificate (the device id the hub checks; the MQTT username with
    /// `use_identity_as_username`).
    pub id: String,
    /// Certificate (PEM).
    pub cert: PathBuf,
    /// Private key (PEM, PKCS#8).
    pub key: PathBuf,
}

/// A test CA with a server certificate for `127.0.0.1`/`localhost`, issuing client certificates.
pub struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// CA certificate (PEM): `mqtt.ca` for the agent, `cafile` for the broker, `--client-ca` for
    /// the hub.
    pub ca: PathBuf,
    /// Server certificate (PEM) of the broker or the hub.
    pub server_cert: PathBuf,
    /// Server key (PEM).
    pub server_key: PathBuf,
}

fn ca_params(name: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(params)
}

fn write_private(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}

impl Pki {
    /// Generates a CA named `name` and a server certificate in `dir`.
    pub fn generate(dir: &Path, name: &str) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let ca_key = KeyPair::generate()?;
        let params = ca_params(name)?;
        let ca_cert = params.self_signed(&ca_key)?;
        let issuer = Issuer::new(params, ca_key);
        let ca = dir.join("ca.pem");
        write_private(&ca, &ca_cert.pem())?;

        let server_key = KeyPair::generate()?;
        let mut sp = CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])?;
        sp.distinguished_name.push(DnType::CommonName, "localhost");
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server = sp.signed_by(&server_key, &issuer)?;
        let server_cert = dir.join("server.pem");
        let server_key_path = dir.join("server.key");
        write_private(&server_cert, &server.pem())?;
        write_private(&server_key_path, &server_key.serialize_pem())?;
        Ok(Pki {
            dir: dir.to_owned(),
            issuer,
            ca,
            server_cert,
            server_key: server_key_path,
        })
    }

    /// Issues (or re-issues) a client certificate with CN = `id`.
    pub fn client(&self, id: &str) -> Result<ClientCert> {
        self.issue(id, id, false)
    }

    /// A client certificate with CN = `id` that expired long ago (valid in 2000 only).
    pub fn expired_client(&self, id: &str) -> Result<ClientCert> {
        self.issue(id, &format!("expired-{id}"), true)
    }

    fn issue(&self, id: &str, file: &str, expired: bool) -> Result<ClientCert> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, id);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if expired {
            params.not_before = rcgen::date_time_ymd(2000, 1, 1);
            params.not_after = rcgen::date_time_ymd(2001, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer)?;
        let cert_path = self.dir.join(format!("client-{file}.pem"));
        let key_path = self.dir.join(format!("client-{file}.key"));
        write_private(&cert_path, &cert.pem())?;
        write_private(&key_path, &key.serialize_pem())?;
        Ok(ClientCert {
            id: id.to_owned(),
            cert: cert_path,
            key: key_path,
        })
    }

    /// A client certificate with CN = `id` from a fresh, unrelated CA (the broker and the hub must refuse it).
    pub fn foreign_client(&self, id: &str) -> Result<ClientCert> {
        let other = Pki::generate(&self.dir.join("foreign"), "not the fleet CA")?;
        other.client(id)
    }
}
