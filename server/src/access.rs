//! Who is calling, and what they may call.
//!
//! A client's identity is what its certificate names: its DNS subject
//! alternative names, its URI SANs (SPIFFE IDs such as
//! `spiffe://example.org/ns/team-a/sa/trainer`), and, when it has neither,
//! its subject common name. The certificate chain has already been verified
//! by rustls against the client CA (and CRLs) when these are read.
//!
//! The [`Policy`] grants kernels to identities. A rule matches an identity
//! exactly, or by prefix when its pattern ends in `*`; kernel patterns work
//! the same way, and `*` alone matches everything. An identity that matches
//! at least one rule may call exactly the kernels those rules grant; an
//! identity that matches none gets the default.

use serde::Deserialize;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The names a client's certificate gives it, most specific first.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Identity {
    names: Vec<String>,
}

impl Identity {
    /// Reads the identity of the end-entity certificate `der`; none (no
    /// names) for a certificate that does not parse.
    pub fn from_cert(der: &[u8]) -> Self {
        let Ok((_, cert)) = X509Certificate::from_der(der) else {
            return Self::default();
        };
        let mut names = Vec::new();
        // A SAN extension that does not parse names nobody: the names it
        // was meant to carry must not fall back to the common name.
        let Ok(san) = cert.subject_alternative_name() else {
            return Self::default();
        };
        if let Some(san) = san {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) => names.push((*uri).to_owned()),
                    GeneralName::DNSName(dns) => names.push((*dns).to_owned()),
                    _ => {}
                }
            }
        }
        if names.is_empty()
            && let Some(cn) = cert.subject().iter_common_name().next()
            && let Ok(cn) = cn.as_str()
        {
            names.push(cn.to_owned());
        }
        Self { names }
    }

    /// An identity of these names, as a certificate would give them.
    #[cfg(test)]
    pub(crate) fn from_names(names: Vec<String>) -> Self {
        Self { names }
    }

    /// Every name.
    pub fn names(&self) -> &[String] {
        &self.names
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.names.is_empty() {
            f.write_str("(anonymous)")
        } else {
            f.write_str(&self.names.join(","))
        }
    }
}

/// What an identity that matches no rule may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DefaultAccess {
    /// Call any kernel.
    #[default]
    Allow,
    /// Call nothing.
    Deny,
}

/// One grant: identities matching `identity` may call `kernels`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// An identity, or a prefix ending in `*`.
    pub identity: String,
    /// Kernel names or prefixes ending in `*`; `*` for all.
    pub kernels: Vec<String>,
}

/// The access policy (`[access]` in the server's config file).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// For identities that match no rule.
    #[serde(default)]
    pub default: DefaultAccess,
    /// The grants.
    #[serde(default, rename = "rule")]
    pub rules: Vec<Rule>,
}

/// DNS names and common names compare case-insensitively (as DNS does);
/// URIs (SPIFFE IDs) exactly, since their paths are case-sensitive.
fn matches(pattern: &str, value: &str) -> bool {
    let fold = !value.contains("://");
    let eq = |a: &str, b: &str| {
        if fold {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    };
    match pattern.strip_suffix('*') {
        Some(prefix) => value
            .get(..prefix.len())
            .is_some_and(|head| eq(head, prefix)),
        None => eq(pattern, value),
    }
}

impl Policy {
    /// A policy that lets every authenticated client call every kernel.
    pub fn allow_all() -> Self {
        Self::default()
    }

    /// Checks the patterns: `*` may only end one.
    ///
    /// # Errors
    /// A message naming the first bad pattern.
    pub fn validate(&self) -> Result<(), String> {
        for rule in &self.rules {
            for p in std::iter::once(&rule.identity).chain(&rule.kernels) {
                if p.is_empty() || p.trim_end_matches('*').contains('*') || p.ends_with("**") {
                    return Err(format!(
                        "access pattern `{p}`: `*` may only end a pattern (a prefix), and patterns cannot be empty"
                    ));
                }
            }
        }
        Ok(())
    }

    /// May `who` call `kernel`?
    pub fn allows(&self, who: &Identity, kernel: &str) -> bool {
        let mut matched = false;
        for rule in &self.rules {
            if who.names.iter().any(|n| matches(&rule.identity, n)) {
                matched = true;
                if rule.kernels.iter().any(|k| matches(k, kernel)) {
                    return true;
                }
            }
        }
        !matched && self.default == DefaultAccess::Allow
    }
}

/// The certificates a connection's peer presented, its own first; none
/// before the handshake is done.
pub(crate) fn peer_chain(
    conn: &quinn::Connection,
) -> Vec<rustls_pki_types::CertificateDer<'static>> {
    conn.peer_identity()
        .and_then(|any| {
            any.downcast::<Vec<rustls_pki_types::CertificateDer<'static>>>()
                .ok()
        })
        .map(|chain| *chain)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(names: &[&str]) -> Identity {
        Identity {
            names: names.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn rules_grant_and_default_applies_to_the_unmatched() {
        let p: Policy = toml::from_str(
            r#"
            default = "deny"
            [[rule]]
            identity = "alice"
            kernels = ["saxpy", "matmul"]
            [[rule]]
            identity = "spiffe://example.org/ns/team-a/*"
            kernels = ["*"]
            "#,
        )
        .expect("policy");
        assert!(p.allows(&who(&["alice"]), "saxpy"));
        assert!(!p.allows(&who(&["alice"]), "histogram"));
        assert!(p.allows(
            &who(&["spiffe://example.org/ns/team-a/sa/trainer"]),
            "histogram"
        ));
        assert!(!p.allows(&who(&["spiffe://example.org/ns/team-b/sa/x"]), "saxpy"));
        assert!(!p.allows(&who(&["bob"]), "saxpy"));
        assert!(!p.allows(&Identity::default(), "saxpy"));

        let open: Policy = toml::from_str(
            r#"
            [[rule]]
            identity = "intern"
            kernels = ["add"]
            "#,
        )
        .expect("policy");
        assert!(open.allows(&who(&["bob"]), "matmul"), "default is allow");
        assert!(
            !open.allows(&who(&["intern"]), "matmul"),
            "a matched identity gets only its grants"
        );
        assert!(
            toml::from_str::<Policy>("defualt = 'deny'").is_err(),
            "typos are errors"
        );
    }

    #[test]
    fn case_and_pattern_rules() {
        let p: Policy = toml::from_str(
            "default = 'deny'\n[[rule]]\nidentity = 'alice'\nkernels = ['*']\n[[rule]]\nidentity = 'spiffe://example.org/ns/a/*'\nkernels = ['add']",
        )
        .expect("policy");
        assert!(p.validate().is_ok());
        assert!(p.allows(&who(&["ALICE"]), "saxpy"), "DNS names ignore case");
        assert!(p.allows(&who(&["spiffe://example.org/ns/a/x"]), "add"));
        assert!(
            !p.allows(&who(&["spiffe://example.org/NS/a/x"]), "add"),
            "URI paths do not"
        );
        let bad: Policy =
            toml::from_str("[[rule]]\nidentity = 'a*b'\nkernels = ['*']").expect("parse");
        assert!(bad.validate().is_err());
    }

    #[test]
    fn identity_comes_from_sans() {
        let ca = rcgen::CertificateParams::new(vec!["alice".to_owned()]).expect("params");
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = ca.self_signed(&key).expect("cert");
        assert_eq!(
            Identity::from_cert(cert.der()).names(),
            &["alice".to_owned()]
        );
        assert!(Identity::from_cert(b"junk").names().is_empty());
    }
}
