//! Quasar's PKI: a certificate authority, a server certificate and client
//! certificates, made with rcgen and written as PEM.
//!
//! The CA signs both the server certificate (presented to clients, who check
//! it against the CA and the server name) and client certificates (presented
//! to the server, which accepts only those from its client CA). Identities
//! are the client certificate's subject alternative names.
//!
//! # Layout
//! - [`CertificateAuthority`]: generate a CA or load one from PEM, and issue
//!   server and client certificates from it, in memory.
//! - [`PkiDir`]: the files of a PKI on disk (`ca.pem`, `ca.key`, `server.pem`,
//!   `server.key`, `<client>.pem`, `<client>.key`), written with private keys
//!   readable by their owner only and never overwriting without `force`.
//!
//! Everything here is synchronous and meant for command-line tools and tests,
//! not for a server's request path.

use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevocationReason, RevokedCertParams, SanType, SerialNumber,
};
use thiserror::Error;
use time::{Duration, OffsetDateTime};

/// The list of revoked serial numbers earlier versions kept beside
/// `crl.pem`; removed when found.
const LEGACY_REVOKED_LIST: &str = "revoked.txt";

/// A revoked certificate: its serial number and when it was revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// The certificate's serial number, as encoded in it.
    pub serial: Vec<u8>,
    /// When it was revoked (whole seconds, as a CRL records it).
    pub revoked_at: OffsetDateTime,
}

/// What `crl_pem` revokes, and its CRL number, after checking that the CA
/// in `ca_pem` signed it.
fn revoked_by(
    crl_pem: &str,
    ca_pem: &str,
    path: &Path,
) -> Result<(Vec<Revocation>, u64), CertError> {
    let bad = |detail: String| CertError::BadCertificate {
        path: path.to_owned(),
        detail,
    };
    let (_, crl_der) =
        x509_parser::pem::parse_x509_pem(crl_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let (_, crl) =
        x509_parser::parse_x509_crl(&crl_der.contents).map_err(|e| bad(e.to_string()))?;
    let (_, ca_der) =
        x509_parser::pem::parse_x509_pem(ca_pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
    let ca = ca_der.parse_x509().map_err(|e| bad(e.to_string()))?;
    crl.verify_signature(ca.public_key())
        .map_err(|e| bad(format!("not signed by this directory's CA: {e}")))?;
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| {
            let revoked_at = OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                .map_err(|e| bad(format!("revocation date: {e}")))?;
            Ok(Revocation {
                serial: r.raw_serial().to_vec(),
                revoked_at,
            })
        })
        .collect::<Result<_, CertError>>()?;
    let number = crl
        .crl_number()
        .and_then(|n| {
            let digits = n.to_u64_digits();
            match digits.as_slice() {
                [] => Some(0),
                [d] => Some(*d),
                _ => None,
            }
        })
        .unwrap_or(0);
    Ok((revoked, number))
}

fn remove_if_present(path: &Path) -> Result<(), CertError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(CertError::Io {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Why a certificate could not be made, loaded or written.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum CertError {
    /// rcgen failed to generate, sign or parse.
    #[error("certificate generation: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// A name is not usable as a certificate identity and file name.
    #[error(
        "invalid name `{name}`: use 1-63 characters of letters, digits, '-' and '.', not starting with '-' or '.'"
    )]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// A name is reserved for the CA or server files.
    #[error("`{name}` is reserved for the CA and server files; choose another client name")]
    ReservedName {
        /// The name given.
        name: String,
    },
    /// A certificate could not be parsed (to read its serial number).
    #[error("{path}: not a certificate rcgen wrote: {detail}")]
    BadCertificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// A URI is not usable as a SAN.
    #[error("invalid URI `{uri}`: it must have a scheme, such as spiffe://example.org/ns/a/sa/b")]
    InvalidUri {
        /// The URI given.
        uri: String,
    },
    /// A revocation date a CRL cannot record (before year 0 or after 9999).
    #[error("revocation date {at} cannot be written in a CRL (years 0 to 9999)")]
    RevocationDate {
        /// The date given.
        at: OffsetDateTime,
    },
    /// Files already exist and `force` was not given.
    #[error("refusing to overwrite existing files without --force: {}", paths_list(.paths))]
    Exists {
        /// The files that exist.
        paths: Vec<PathBuf>,
    },
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

fn paths_list(paths: &[PathBuf]) -> String {
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A certificate and its private key, as PEM.
#[derive(Clone)]
pub struct Identity {
    /// The certificate, PEM-encoded.
    pub cert_pem: String,
    /// The private key (PKCS#8), PEM-encoded.
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a private key, even in debug output.
        f.debug_struct("Identity")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start of validity.
    pub not_before: OffsetDateTime,
    /// End of validity.
    pub not_after: OffsetDateTime,
}

impl Validity {
    /// From an hour ago (to tolerate small clock differences) for `days` days.
    pub fn days(days: i64) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(days),
        }
    }

    /// From an hour ago until `lasting` from now: a short-lived
    /// certificate. X.509 records whole seconds, so the end is rounded
    /// down to one.
    pub fn lasting(lasting: std::time::Duration) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::hours(1),
            not_after: now.saturating_add(Duration::try_from(lasting).unwrap_or(Duration::MAX)),
        }
    }

    /// A window that ended a day ago: for testing that expired certificates
    /// are refused.
    pub fn expired() -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            not_before: now - Duration::days(30),
            not_after: now - Duration::days(1),
        }
    }
}

impl Default for Validity {
    fn default() -> Self {
        Self::days(365)
    }
}

/// A certificate authority that can issue server and client certificates.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    /// Generates a new CA (ECDSA P-256) valid for ten years.
    ///
    /// # Errors
    /// [`CertError::Rcgen`] if key generation or signing fails.
    pub fn generate(common_name: &str) -> Result<Self, CertError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationName, "Quasar");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let validity = Validity::days(3650);
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        let key = KeyPair::generate()?;
        let cert = params.self_signed(&key)?;
        Ok(Self {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and private key in PEM.
    ///
    /// # Errors
    /// [`CertError::Rcgen`] if either does not parse.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_owned(),
        })
    }

    /// The CA certificate in PEM: what peers trust.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key in PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a server certificate for the given DNS names and IP addresses.
    ///
    /// # Errors
    /// [`CertError::Rcgen`] if a name is not a valid SAN or signing fails.
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        validity: Validity,
    ) -> Result<Identity, CertError> {
        let mut params = CertificateParams::new(dns_names.to_vec())?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let cn = dns_names
            .first()
            .cloned()
            .or_else(|| ips.first().map(ToString::to_string))
            .unwrap_or_else(|| "quasar-server".to_owned());
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        self.sign(params, validity)
    }

    /// Issues a client certificate whose identity (common name and DNS SAN)
    /// is `name`.
    ///
    /// # Errors
    /// [`CertError::InvalidName`] for a name that is not a DNS-style label
    /// sequence, or [`CertError::Rcgen`].
    pub fn issue_client(&self, name: &str, validity: Validity) -> Result<Identity, CertError> {
        self.issue_client_with_uris(name, &[], validity)
    }

    /// Issues a client certificate named `name` that also carries URI SANs
    /// (SPIFFE IDs, say), which the server's access policy can name.
    ///
    /// # Errors
    /// As [`CertificateAuthority::issue_client`], or
    /// [`CertError::InvalidUri`].
    pub fn issue_client_with_uris(
        &self,
        name: &str,
        uris: &[String],
        validity: Validity,
    ) -> Result<Identity, CertError> {
        check_name(name)?;
        let mut params = CertificateParams::new(vec![name.to_owned()])?;
        for uri in uris {
            if !uri.contains("://") || uri.chars().any(char::is_whitespace) {
                return Err(CertError::InvalidUri { uri: uri.clone() });
            }
            let ia5 = uri
                .as_str()
                .try_into()
                .map_err(|_| CertError::InvalidUri { uri: uri.clone() })?;
            params.subject_alt_names.push(SanType::URI(ia5));
        }
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.sign(params, validity)
    }

    /// A certificate revocation list, signed by this CA, revoking these
    /// certificates (each with its own revocation date); valid for `days`.
    ///
    /// # Errors
    /// [`CertError::RevocationDate`] for a date outside years 0 to 9999;
    /// [`CertError::Rcgen`] if signing fails.
    pub fn crl(&self, revoked: &[Revocation], number: u64, days: i64) -> Result<String, CertError> {
        let now = OffsetDateTime::now_utc();
        // The encoder picks UTCTime or GeneralizedTime by the year in the
        // date's own offset and asserts on years it cannot write: dates go
        // in as UTC, and unwritable ones are refused here.
        let revoked = revoked
            .iter()
            .map(|r| {
                let at = r.revoked_at.to_offset(time::UtcOffset::UTC);
                if (0..=9999).contains(&at.year()) {
                    Ok((r, at))
                } else {
                    Err(CertError::RevocationDate { at: r.revoked_at })
                }
            })
            .collect::<Result<Vec<_>, _>>()?;
        let params = CertificateRevocationListParams {
            this_update: now - Duration::hours(1),
            next_update: now + Duration::days(days),
            crl_number: SerialNumber::from_slice(&number.to_be_bytes()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|(r, at)| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial),
                    revocation_time: *at,
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }

    fn sign(
        &self,
        mut params: CertificateParams,
        validity: Validity,
    ) -> Result<Identity, CertError> {
        params.not_before = validity.not_before;
        params.not_after = validity.not_after;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Identity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

/// Checks that a client name is usable both as a DNS SAN and as a file name.
fn check_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() < 64
        && !name.starts_with(['-', '.'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    if !ok {
        return Err(CertError::InvalidName {
            name: name.to_owned(),
        });
    }
    if matches!(name, "ca" | "server") {
        return Err(CertError::ReservedName {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// The files of a PKI in one directory.
#[derive(Debug, Clone)]
pub struct PkiDir {
    dir: PathBuf,
}

impl PkiDir {
    /// A PKI rooted at `dir` (which need not exist yet).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the CA certificate.
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }
    /// Path of the CA private key.
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    /// Path of the server certificate.
    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.pem")
    }
    /// Path of the server private key.
    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }
    /// Path of a client's certificate.
    pub fn client_cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }
    /// Path of a client's private key.
    pub fn client_key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// Generates a CA, a server certificate for `dns_names` and `ips`, and a
    /// certificate for each client, and writes them all.
    ///
    /// Nothing is written if any target file exists and `force` is false.
    ///
    /// # Errors
    /// [`CertError::Exists`], [`CertError::InvalidName`], generation or I/O
    /// errors.
    pub fn init(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        clients: &[String],
        force: bool,
    ) -> Result<CertificateAuthority, CertError> {
        for c in clients {
            check_name(c)?;
        }
        let mut targets = vec![
            self.ca_cert(),
            self.ca_key(),
            self.server_cert(),
            self.server_key(),
        ];
        for c in clients {
            targets.push(self.client_cert(c));
            targets.push(self.client_key(c));
        }
        refuse_existing(&targets, force)?;
        // A new CA invalidates the old CRL: a server given it would refuse
        // every client of the new CA.
        for stale in [self.crl(), self.dir.join(LEGACY_REVOKED_LIST)] {
            remove_if_present(&stale)?;
        }

        let ca = CertificateAuthority::generate("Quasar CA")?;
        let server = ca.issue_server(dns_names, ips, Validity::default())?;
        fs::create_dir_all(&self.dir).map_err(|source| CertError::Io {
            path: self.dir.clone(),
            source,
        })?;
        write_file(&self.ca_cert(), ca.cert_pem(), false)?;
        write_file(&self.ca_key(), &ca.key_pem(), true)?;
        write_file(&self.server_cert(), &server.cert_pem, false)?;
        write_file(&self.server_key(), &server.key_pem, true)?;
        for c in clients {
            self.write_client(&ca, c, &[])?;
        }
        Ok(ca)
    }

    /// Loads this directory's CA.
    ///
    /// # Errors
    /// I/O errors, or [`CertError::Rcgen`] if the files do not parse.
    pub fn load_ca(&self) -> Result<CertificateAuthority, CertError> {
        let cert = read_file(&self.ca_cert())?;
        let key = read_file(&self.ca_key())?;
        CertificateAuthority::from_pem(&cert, &key)
    }

    /// Path of the certificate revocation list.
    pub fn crl(&self) -> PathBuf {
        self.dir.join("crl.pem")
    }

    /// Revokes client `name`'s certificate: writes a new `crl.pem` (valid 30
    /// days) listing it and every certificate the current `crl.pem`
    /// revokes. Servers started with `--crl` refuse it on the next
    /// handshake.
    ///
    /// The current CRL is the record of what is revoked; it must carry this
    /// directory's CA's signature, so an edited file cannot drop a
    /// revocation into the next CRL.
    ///
    /// # Errors
    /// I/O errors, [`CertError::BadCertificate`] (also for a `crl.pem`
    /// that does not parse or that this CA did not sign), or signing
    /// errors.
    pub fn revoke(&self, name: &str) -> Result<PathBuf, CertError> {
        check_name(name)?;
        let path = self.client_cert(name);
        let pem = read_file(&path)?;
        let bad = |detail: String| CertError::BadCertificate {
            path: path.clone(),
            detail,
        };
        let (_, der) =
            x509_parser::pem::parse_x509_pem(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let cert = der.parse_x509().map_err(|e| bad(e.to_string()))?;
        let serial = cert.raw_serial().to_vec();
        let ca = self.load_ca()?;
        let (mut revoked, previous) = match fs::read_to_string(self.crl()) {
            Ok(crl) => revoked_by(&crl, ca.cert_pem(), &self.crl())?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Vec::new(), 0),
            Err(source) => {
                return Err(CertError::Io {
                    path: self.crl(),
                    source,
                });
            }
        };
        // Entries already revoked keep their dates; a new one is dated a
        // minute back, so a verifier whose clock is a little behind does
        // not see a revocation from the future.
        if !revoked.iter().any(|r| r.serial == serial) {
            revoked.push(Revocation {
                serial,
                revoked_at: OffsetDateTime::now_utc() - Duration::minutes(1),
            });
        }
        // CRL numbers must grow: the time in seconds does across runs, and
        // two revocations within a second take the next number.
        let now = u64::try_from(OffsetDateTime::now_utc().unix_timestamp()).unwrap_or(1);
        let number = now.max(previous.saturating_add(1));
        let crl = ca.crl(&revoked, number, 30)?;
        // The CRL is the only record of what is revoked: replaced whole
        // (written aside, then renamed over), never left half-written.
        let fresh = self.dir.join("crl.pem.tmp");
        write_file(&fresh, &crl, false)?;
        fs::rename(&fresh, self.crl()).map_err(|source| CertError::Io {
            path: self.crl(),
            source,
        })?;
        // Earlier versions kept the serials in a separate list as well.
        remove_if_present(&self.dir.join(LEGACY_REVOKED_LIST))?;
        Ok(self.crl())
    }

    /// Issues one more client certificate from this directory's CA.
    ///
    /// # Errors
    /// [`CertError::Exists`] unless `force`, and as [`PkiDir::load_ca`].
    pub fn add_client(
        &self,
        name: &str,
        uris: &[String],
        force: bool,
    ) -> Result<Identity, CertError> {
        check_name(name)?;
        refuse_existing(&[self.client_cert(name), self.client_key(name)], force)?;
        let ca = self.load_ca()?;
        self.write_client(&ca, name, uris)
    }

    fn write_client(
        &self,
        ca: &CertificateAuthority,
        name: &str,
        uris: &[String],
    ) -> Result<Identity, CertError> {
        let id = ca.issue_client_with_uris(name, uris, Validity::default())?;
        write_file(&self.client_cert(name), &id.cert_pem, false)?;
        write_file(&self.client_key(name), &id.key_pem, true)?;
        Ok(id)
    }
}

fn refuse_existing(targets: &[PathBuf], force: bool) -> Result<(), CertError> {
    if force {
        return Ok(());
    }
    let existing: Vec<PathBuf> = targets.iter().filter(|p| p.exists()).cloned().collect();
    if existing.is_empty() {
        Ok(())
    } else {
        Err(CertError::Exists { paths: existing })
    }
}

fn read_file(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Io {
        path: path.to_owned(),
        source,
    })
}

/// Writes `contents` to `path`; private files get mode 0600 from creation on,
/// so a key is never readable by others, not even briefly.
fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), CertError> {
    let io = |source| CertError::Io {
        path: path.to_owned(),
        source,
    };
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        opts.mode(if private { 0o600 } else { 0o644 });
        let mut f = opts.open(path).map_err(io)?;
        // An existing file (with --force) keeps its old mode unless we set it.
        let mode = if private { 0o600 } else { 0o644 };
        f.set_permissions(fs::Permissions::from_mode(mode))
            .map_err(io)?;
        f.write_all(contents.as_bytes()).map_err(io)?;
    }
    #[cfg(not(unix))]
    {
        let _ = private;
        let mut f = opts.open(path).map_err(io)?;
        f.write_all(contents.as_bytes()).map_err(io)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_writes_files_with_private_keys_0600_and_refuses_overwrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init(
            &["localhost".into()],
            &["127.0.0.1".parse().expect("ip")],
            &["alice".into()],
            false,
        )
        .expect("init");
        for p in [pki.ca_cert(), pki.server_cert(), pki.client_cert("alice")] {
            assert!(
                fs::read_to_string(&p)
                    .expect("read")
                    .contains("BEGIN CERTIFICATE")
            );
        }
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            for p in [pki.ca_key(), pki.server_key(), pki.client_key("alice")] {
                let mode = fs::metadata(&p).expect("meta").permissions().mode() & 0o777;
                assert_eq!(mode, 0o600, "{}", p.display());
            }
        }
        let before = fs::read_to_string(pki.ca_cert()).expect("read");
        let err = pki
            .init(&["localhost".into()], &[], &["alice".into()], false)
            .expect_err("must refuse");
        assert!(matches!(err, CertError::Exists { .. }), "{err}");
        assert_eq!(fs::read_to_string(pki.ca_cert()).expect("read"), before);

        pki.add_client("bob", &[], false).expect("bob");
        assert!(pki.client_key("bob").exists());
        assert!(matches!(
            pki.add_client("bob", &[], false),
            Err(CertError::Exists { .. })
        ));
        pki.add_client("bob", &["spiffe://example.org/sa/bob".into()], true)
            .expect("forced");
        let crl = pki.revoke("bob").expect("revoke");
        assert!(
            fs::read_to_string(&crl)
                .expect("crl")
                .contains("BEGIN X509 CRL")
        );
        let first = fs::read_to_string(&crl).expect("crl");
        pki.revoke("alice").expect("revoke another");
        pki.revoke("alice").expect("revoking twice is harmless");
        let ca = pki.load_ca().expect("ca");
        let (_, first_number) = revoked_by(&first, ca.cert_pem(), &crl).expect("first CRL");
        let (revoked, number) =
            revoked_by(&fs::read_to_string(&crl).expect("crl"), ca.cert_pem(), &crl)
                .expect("the CRL is this CA's");
        assert_eq!(revoked.len(), 2, "bob and alice, once each");
        // Three CRLs within a second still get growing numbers.
        assert!(number >= first_number + 2, "{first_number} -> {number}");
        // A CRL this CA did not sign is refused, not merged.
        let other = CertificateAuthority::generate("other CA").expect("ca");
        let stranger = Revocation {
            serial: vec![1, 2, 3],
            revoked_at: OffsetDateTime::now_utc(),
        };
        fs::write(&crl, other.crl(&[stranger], 1, 1).expect("crl")).expect("write");
        assert!(matches!(
            pki.revoke("bob"),
            Err(CertError::BadCertificate { .. })
        ));
        assert!(
            pki.add_client("carol", &["not a uri".into()], false)
                .is_err()
        );
        pki.init(&["localhost".into()], &[], &["alice".into()], true)
            .expect("forced init");
        assert_ne!(fs::read_to_string(pki.ca_cert()).expect("read"), before);
    }

    #[test]
    fn a_new_revocation_keeps_the_dates_of_earlier_ones() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = PkiDir::new(dir.path().join("pki"));
        pki.init(
            &["localhost".into()],
            &[],
            &["alice".into(), "bob".into()],
            false,
        )
        .expect("init");
        let ca = pki.load_ca().expect("ca");
        let serial_of = |name: &str| {
            let pem = fs::read_to_string(pki.client_cert(name)).expect("cert");
            let (_, der) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem");
            der.parse_x509().expect("x509").raw_serial().to_vec()
        };
        // Bob was revoked long ago, by an earlier CRL of this CA, beside two
        // certificates dated on each side of UTCTime's range (1950-2049)
        // and one given in another offset.
        let date = |secs| OffsetDateTime::from_unix_timestamp(secs).expect("date");
        let earlier = [
            Revocation {
                serial: serial_of("bob"),
                revoked_at: date(1_600_000_000),
            },
            Revocation {
                serial: vec![0x19, 0x60],
                revoked_at: date(-300_000_000),
            },
            Revocation {
                serial: vec![0x20, 0x60],
                revoked_at: date(2_900_000_000),
            },
        ];
        let eastern = Revocation {
            serial: vec![0x20, 0x49],
            // 2049-12-31 22:00 at UTC-5 is 2050 in UTC.
            revoked_at: date(2_524_604_400)
                .to_offset(time::UtcOffset::from_hms(-5, 0, 0).expect("offset")),
        };
        let mut first = earlier.to_vec();
        first.push(eastern.clone());
        fs::write(pki.crl(), ca.crl(&first, 7, 30).expect("crl")).expect("write");
        let unwritable = Revocation {
            serial: vec![1],
            revoked_at: date(-70_000_000_000),
        };
        assert!(matches!(
            ca.crl(&[unwritable], 8, 30),
            Err(CertError::RevocationDate { .. })
        ));

        pki.revoke("alice").expect("revoke");
        let (revoked, number) = revoked_by(
            &fs::read_to_string(pki.crl()).expect("crl"),
            ca.cert_pem(),
            &pki.crl(),
        )
        .expect("the CRL is this CA's");
        assert!(number > 7);
        assert_eq!(revoked.len(), 5);
        for kept in &earlier {
            assert!(revoked.contains(kept), "{kept:?} kept: {revoked:?}");
        }
        let east = revoked
            .iter()
            .find(|r| r.serial == eastern.serial)
            .expect("listed");
        assert_eq!(east.revoked_at, eastern.revoked_at, "the same instant");
        let alice = revoked
            .iter()
            .find(|r| r.serial == serial_of("alice"))
            .expect("alice revoked");
        let age = OffsetDateTime::now_utc() - alice.revoked_at;
        assert!(
            age >= Duration::ZERO && age < Duration::minutes(5),
            "alice revoked now: {age}"
        );
    }

    #[test]
    fn bad_names_are_refused() {
        for bad in ["", "../x", "a/b", ".hidden", "-x", "ca", "server", "a b"] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["alice", "team-a.trainer", "bob2"] {
            assert!(check_name(good).is_ok(), "{good:?} refused");
        }
    }
}
