//! The mesh's certificate authority: signs sidecars' CSRs into short-lived leaf certificates
//! whose only name is the URI SAN `spiffe://<trust domain>/agent/<name>`.
//!
//! Nothing a CSR asks for is copied but its public key (after its signature proves the
//! sidecar holds the private key): names, validity, key usages and CA flags are the CA's own.
//! The CA key is made once and kept in the state directory (`ca.pem`, `ca-key.pem`, mode
//! 0600), or comes from an operator's files (bring your own CA, possibly an intermediate).

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType,
    SerialNumber,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// A self-made root's lifetime: long enough to outlive any deployment's reinstall cycle;
/// rotating it is replacing the state directory's files.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Leaf certificates start this long before they are signed, for clocks a little behind.
const BACKDATE: Duration = Duration::from_secs(60);

/// Where the CA's certificate and key come from.
#[derive(Clone, Debug)]
pub enum CaSource {
    /// `ca.pem` and `ca-key.pem` in this directory, made on first start.
    StateDir(PathBuf),
    /// An operator's CA (PEM files); the certificate may be an intermediate.
    Files { cert: PathBuf, key: PathBuf },
}

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot make the CA: {0}")]
    Generate(rcgen::Error),
}

/// Why a CSR was not signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("not a valid certificate signing request: {0}")]
    BadCsr(rcgen::Error),
    #[error("cannot sign: {0}")]
    Sign(rcgen::Error),
}

/// A signed leaf certificate with the CA certificate that verifies it.
#[derive(Clone, Debug)]
pub struct Issued {
    pub certificate_pem: String,
    pub ca_pem: String,
    pub spiffe_id: String,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    ca_pem: String,
    trust_domain: String,
    lifetime: Duration,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

// === impl Ca ===

impl Ca {
    /// Loads the CA, making and persisting a new root in a state directory that has none.
    pub fn load(source: &CaSource, trust_domain: &str, lifetime: Duration) -> Result<Ca, CaError> {
        let (cert_path, key_path) = match source {
            CaSource::StateDir(dir) => {
                let cert = dir.join("ca.pem");
                let key = dir.join("ca-key.pem");
                if !cert.exists() && !key.exists() {
                    create_root(dir, &cert, &key, trust_domain)?;
                }
                (cert, key)
            }
            CaSource::Files { cert, key } => (cert.clone(), key.clone()),
        };
        let ca_pem = read(&cert_path)?;
        let key_pem = read(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CaError::Invalid {
            path: key_path.clone(),
            reason: format!("not a PEM private key: {e}"),
        })?;
        check_pair(&cert_path, &ca_pem, &key)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_pem, key).map_err(|e| CaError::Invalid {
            path: cert_path.clone(),
            reason: format!("not a CA certificate for this key: {e}"),
        })?;
        Ok(Ca {
            issuer,
            ca_pem,
            trust_domain: trust_domain.to_owned(),
            lifetime,
        })
    }

    /// The CA certificate sidecars trust, PEM.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// How long the certificates this CA issues are valid.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    pub fn spiffe_id(&self, agent: &str) -> String {
        format!("spiffe://{}/agent/{agent}", self.trust_domain)
    }

    /// Signs `csr_pem`'s public key into a certificate for `agent`, valid from now for the
    /// configured lifetime. The caller has already established that the asker is `agent`.
    pub fn sign(&self, agent: &str, csr_pem: &str) -> Result<Issued, SignError> {
        // Parsing verifies the CSR's self-signature: the asker holds the private key.
        let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(SignError::BadCsr)?;
        let spiffe_id = self.spiffe_id(agent);
        let now = SystemTime::now();
        let not_before = now - BACKDATE;
        let not_after = now + self.lifetime;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, agent);
        params.subject_alt_names = vec![SanType::URI(
            spiffe_id.clone().try_into().map_err(SignError::Sign)?,
        )];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(SignError::Sign)?;
        Ok(Issued {
            certificate_pem: cert.pem(),
            ca_pem: self.ca_pem.clone(),
            spiffe_id,
            not_before,
            not_after,
        })
    }
}

/// The control process's own serving certificate, with its key (PKCS#8 DER).
pub struct ServerIssued {
    /// The leaf, then the CA certificate, so a sidecar trusting a root above a
    /// bring-your-own intermediate still builds the chain.
    pub chain_pem: String,
    pub key_pkcs8: Vec<u8>,
    pub not_after: SystemTime,
}

// === impl Ca (the control channel's certificate) ===

impl Ca {
    /// Issues the control channel's server certificate for the names and addresses sidecars
    /// dial, valid for the configured lifetime, on a key made here.
    pub fn issue_server(&self, dns: &[String], ips: &[IpAddr]) -> Result<ServerIssued, SignError> {
        let key = KeyPair::generate().map_err(SignError::Sign)?;
        let now = SystemTime::now();
        let not_after = now + self.lifetime;
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(
            DnType::CommonName,
            format!("{} mesh control", self.trust_domain),
        );
        params.subject_alt_names = dns
            .iter()
            .map(|d| d.clone().try_into().map(SanType::DnsName))
            .chain(ips.iter().map(|ip| Ok(SanType::IpAddress(*ip))))
            .collect::<Result<_, _>>()
            .map_err(SignError::Sign)?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(SignError::Sign)?;
        Ok(ServerIssued {
            chain_pem: format!("{}{}", cert.pem(), self.ca_pem),
            key_pkcs8: key.serialize_der(),
            not_after,
        })
    }
}

/// The certificate must be a CA, in force, and for this key: a mismatched pair would sign
/// certificates no sidecar could verify.
fn check_pair(path: &Path, ca_pem: &str, key: &KeyPair) -> Result<(), CaError> {
    let invalid = |reason: String| CaError::Invalid {
        path: path.to_owned(),
        reason,
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(ca_pem.as_bytes())
        .map_err(|e| invalid(format!("not a PEM certificate: {e}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|e| invalid(format!("not an X.509 certificate: {e}")))?;
    if !cert.is_ca() {
        return Err(invalid(
            "not a CA certificate (no basicConstraints CA)".into(),
        ));
    }
    if !cert.validity().is_valid() {
        return Err(invalid("the CA certificate is not valid now".into()));
    }
    if cert.public_key().raw != key.subject_public_key_info().as_slice() {
        return Err(invalid("the CA certificate is not for this key".into()));
    }
    Ok(())
}

fn random_serial() -> SerialNumber {
    // 16 random bytes, top bit clear so the DER integer stays positive.
    let mut bytes: Vec<u8> = (0..16).map(|_| fastrand::u8(..)).collect();
    bytes[0] &= 0x7f;
    SerialNumber::from(bytes)
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_owned(),
        source,
    })
}

fn create_root(dir: &Path, cert: &Path, key: &Path, trust_domain: &str) -> Result<(), CaError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| CaError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let key_pair = KeyPair::generate().map_err(CaError::Generate)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{trust_domain} mesh root"));
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    params.serial_number = Some(random_serial());
    let root = params.self_signed(&key_pair).map_err(CaError::Generate)?;
    // The key first, owner-only from its creation; then the certificate, whose presence
    // marks a complete pair.
    write_private(key, key_pair.serialize_pem().as_bytes()).map_err(io(key))?;
    std::fs::write(cert, root.pem()).map_err(io(cert))?;
    tracing::info!(dir = %dir.display(), "made a new mesh CA");
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn csr() -> String {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        // What a hostile sidecar might ask for: another name, a CA flag.
        params.subject_alt_names = vec![SanType::DnsName("other.example".try_into().unwrap())];
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.serialize_request(&key).unwrap().pem().unwrap()
    }

    #[test]
    fn a_state_dir_keeps_one_ca_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let source = CaSource::StateDir(dir.path().join("state"));
        let first = Ca::load(&source, "mesh", Duration::from_secs(3600)).unwrap();
        let again = Ca::load(&source, "mesh", Duration::from_secs(3600)).unwrap();
        assert_eq!(first.ca_pem(), again.ca_pem());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("state/ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // Bring your own: the same files named explicitly.
        let files = CaSource::Files {
            cert: dir.path().join("state/ca.pem"),
            key: dir.path().join("state/ca-key.pem"),
        };
        let byo = Ca::load(&files, "mesh", Duration::from_secs(3600)).unwrap();
        assert_eq!(byo.ca_pem(), first.ca_pem());
    }

    #[test]
    fn a_leaf_names_the_agent_and_nothing_the_csr_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load(
            &CaSource::StateDir(dir.path().into()),
            "prod",
            Duration::from_secs(7200),
        )
        .unwrap();
        let issued = ca.sign("agent-a", &csr()).unwrap();
        assert_eq!(issued.spiffe_id, "spiffe://prod/agent/agent-a");
        let life = issued.not_after.duration_since(issued.not_before).unwrap();
        assert_eq!(life, Duration::from_secs(7200) + BACKDATE);
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.certificate_pem.as_bytes()).unwrap();
        let leaf = pem.parse_x509().unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![x509_parser::extensions::GeneralName::URI(
                "spiffe://prod/agent/agent-a"
            )]
        );
        assert!(!leaf.is_ca());
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        assert!(ca.sign("agent-a", "not a csr").is_err());
    }

    #[test]
    fn the_control_channel_certificate_names_what_sidecars_dial_and_serves_only() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load(
            &CaSource::StateDir(dir.path().into()),
            "mesh",
            Duration::from_secs(600),
        )
        .unwrap();
        let issued = ca
            .issue_server(&["mesh-control".into()], &["127.0.0.1".parse().unwrap()])
            .unwrap();
        // The leaf, then the CA: a sidecar trusting a root above an intermediate builds the chain.
        assert!(issued.chain_pem.ends_with(ca.ca_pem()));
        let (_, pem) = x509_parser::pem::parse_x509_pem(issued.chain_pem.as_bytes()).unwrap();
        let leaf = pem.parse_x509().unwrap();
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![
                x509_parser::extensions::GeneralName::DNSName("mesh-control"),
                x509_parser::extensions::GeneralName::IPAddress(&[127, 0, 0, 1]),
            ]
        );
        let eku = leaf.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!leaf.is_ca());
        assert!(ca.issue_server(&["mesh-contröl".into()], &[]).is_err());
    }

    #[test]
    fn a_mismatched_key_and_certificate_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let one = CaSource::StateDir(dir.path().join("one"));
        let two = CaSource::StateDir(dir.path().join("two"));
        Ca::load(&one, "mesh", Duration::from_secs(60)).unwrap();
        Ca::load(&two, "mesh", Duration::from_secs(60)).unwrap();
        let mixed = CaSource::Files {
            cert: dir.path().join("one/ca.pem"),
            key: dir.path().join("two/ca-key.pem"),
        };
        let err = Ca::load(&mixed, "mesh", Duration::from_secs(60)).unwrap_err();
        assert!(err.to_string().contains("ca.pem"), "{err}");
    }
}
