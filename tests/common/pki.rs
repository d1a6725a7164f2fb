//! A CA and its certificates for the TLS tests, made at run time (rcgen) and written in
//! QEMU's layout (`ca-cert.pem`, `server-cert.pem`, `server-key.pem`, `client-cert.pem`,
//! `client-key.pem`).

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};

/// A certificate authority: its certificate and the key that signs.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    /// A new CA named `name`, with a fresh key.
    pub fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// The CA's certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.pem
    }

    /// A certificate signed by this CA for `names` (DNS names or IP addresses), for a
    /// server or a client: `(certificate, key)`, PEM.
    pub fn leaf(&self, names: &[&str], client: bool) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().map_or("client", |n| n.as_str()),
        );
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// Writes this CA's certificate, a server certificate for `server_names` and a client
    /// certificate, with their keys, into `dir` (made if missing), in QEMU's layout.
    pub fn write_dir(&self, dir: &Path, server_names: &[&str]) {
        std::fs::create_dir_all(dir).unwrap();
        let (server, server_key) = self.leaf(server_names, false);
        let (client, client_key) = self.leaf(&["migration-source"], true);
        for (file, pem) in [
            ("ca-cert.pem", self.cert_pem()),
            ("server-cert.pem", &server),
            ("server-key.pem", &server_key),
            ("client-cert.pem", &client),
            ("client-key.pem", &client_key),
        ] {
            std::fs::write(dir.join(file), pem).unwrap();
        }
    }
}
