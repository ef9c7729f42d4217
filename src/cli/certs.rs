//! `quasar certs`: make a PKI on disk.

use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use quasar_certs::PkiDir;

#[derive(Subcommand, Debug)]
pub enum CertsCommand {
    /// Write a CA, a server certificate and client certificates into a directory.
    Init(InitArgs),
    /// Issue one more client certificate from an existing CA.
    Client(ClientArgs),
    /// Revoke a client certificate: writes crl.pem for `quasar serve --crl`.
    Revoke(RevokeArgs),
}

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// Directory holding ca.pem, ca.key and the client's certificate.
    #[arg(long)]
    pki: PathBuf,
    /// The client to revoke.
    #[arg(long)]
    name: String,
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Directory to write into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// DNS names the server certificate is valid for.
    #[arg(long = "server-name", default_value = "localhost")]
    server_names: Vec<String>,
    /// IP addresses the server certificate is valid for.
    #[arg(long = "server-ip")]
    server_ips: Vec<IpAddr>,
    /// A client certificate to issue (repeatable); its name is its identity.
    #[arg(long = "client")]
    clients: Vec<String>,
    /// Overwrite existing files.
    #[arg(long)]
    force: bool,
}

#[derive(Args, Debug)]
pub struct ClientArgs {
    /// Directory holding ca.pem and ca.key.
    #[arg(long)]
    pki: PathBuf,
    /// The client's name (its identity).
    #[arg(long)]
    name: String,
    /// A URI SAN to add (a SPIFFE ID, say), another identity the access policy can name; repeatable.
    #[arg(long = "uri")]
    uris: Vec<String>,
    /// Overwrite an existing certificate of that name.
    #[arg(long)]
    force: bool,
}

pub async fn run(cmd: CertsCommand) -> Result<()> {
    // Key generation and file writes are blocking work: keep them off the runtime.
    tokio::task::spawn_blocking(move || match cmd {
        CertsCommand::Init(a) => {
            let pki = PkiDir::new(&a.out);
            pki.init(&a.server_names, &a.server_ips, &a.clients, a.force)
                .with_context(|| format!("writing the PKI in {}", a.out.display()))?;
            println!(
                "CA:      {} (key {})",
                pki.ca_cert().display(),
                pki.ca_key().display()
            );
            let sans: Vec<String> = a
                .server_names
                .iter()
                .cloned()
                .chain(a.server_ips.iter().map(ToString::to_string))
                .collect();
            println!(
                "server:  {} (key {}) for {}",
                pki.server_cert().display(),
                pki.server_key().display(),
                sans.join(", ")
            );
            for c in &a.clients {
                println!(
                    "client:  {} (key {})",
                    pki.client_cert(c).display(),
                    pki.client_key(c).display()
                );
            }
            Ok(())
        }
        CertsCommand::Client(a) => {
            let pki = PkiDir::new(&a.pki);
            pki.add_client(&a.name, &a.uris, a.force).with_context(|| {
                format!("issuing `{}` from the CA in {}", a.name, a.pki.display())
            })?;
            println!(
                "client:  {} (key {})",
                pki.client_cert(&a.name).display(),
                pki.client_key(&a.name).display()
            );
            Ok(())
        }
        CertsCommand::Revoke(a) => {
            let pki = PkiDir::new(&a.pki);
            let crl = pki
                .revoke(&a.name)
                .with_context(|| format!("revoking `{}` in {}", a.name, a.pki.display()))?;
            println!(
                "revoked: {}; CRL written to {} (serve with --crl {})",
                a.name,
                crl.display(),
                crl.display()
            );
            Ok(())
        }
    })
    .await?
}
