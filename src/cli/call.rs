//! `quasar call`: one call from a shell.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use quasar_client::{Call, Client, ClientConfig, ElemType, Scalar};

#[derive(Args, Debug)]
pub struct CallArgs {
    /// Server address.
    #[arg(long)]
    server: SocketAddr,
    /// Name the server's certificate must be valid for.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// CA that signed the server's certificate (PEM).
    #[arg(long)]
    ca: PathBuf,
    /// This client's certificate (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// This client's private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Kernel to call.
    #[arg(long)]
    kernel: String,
    /// Scalar argument NAME=VALUE[:f32|u32|i32]; without a type, 2.0 is f32, 2 is u32, -2 is i32.
    #[arg(long = "arg", value_parser = parse_arg)]
    args: Vec<(String, Scalar)>,
    /// Input buffer NAME=@FILE (raw little-endian; type from .f32/.u32/.i32 or a :TYPE suffix)
    /// or NAME=1,2,3[:TYPE].
    #[arg(long = "input")]
    inputs: Vec<String>,
    /// Write an output's raw little-endian bytes to a file: NAME=@FILE.
    #[arg(long = "out")]
    outs: Vec<String>,
    /// Give up after this many milliseconds.
    #[arg(long)]
    deadline_ms: Option<u64>,
    /// Dispatch exactly X,Y,Z workgroups instead of the kernel's rule.
    #[arg(long, value_parser = parse_workgroups)]
    workgroups: Option<[u32; 3]>,
    /// Elements of each output to print.
    #[arg(long, default_value_t = 16)]
    show: usize,
}

fn parse_type(s: &str) -> Option<ElemType> {
    match s {
        "f32" => Some(ElemType::F32),
        "u32" => Some(ElemType::U32),
        "i32" => Some(ElemType::I32),
        _ => None,
    }
}

/// Splits a trailing `:f32`, `:u32` or `:i32`.
fn split_type(s: &str) -> (&str, Option<ElemType>) {
    if let Some((head, tail)) = s.rsplit_once(':')
        && let Some(t) = parse_type(tail)
    {
        return (head, Some(t));
    }
    (s, None)
}

fn infer(value: &str) -> ElemType {
    let v = value.trim();
    if v.parse::<i64>().is_ok() {
        if v.starts_with('-') {
            ElemType::I32
        } else {
            ElemType::U32
        }
    } else {
        ElemType::F32
    }
}

fn parse_scalar(value: &str, elem: ElemType) -> Result<Scalar, String> {
    let v = value.trim();
    let bad = |e: &dyn std::fmt::Display| format!("`{v}` is not a valid {elem}: {e}");
    Ok(match elem {
        ElemType::F32 => Scalar::F32(v.parse().map_err(|e| bad(&e))?),
        ElemType::U32 => Scalar::U32(v.parse().map_err(|e| bad(&e))?),
        ElemType::I32 => Scalar::I32(v.parse().map_err(|e| bad(&e))?),
    })
}

pub(crate) fn parse_arg(s: &str) -> Result<(String, Scalar), String> {
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| format!("expected NAME=VALUE, got `{s}`"))?;
    let (value, elem) = split_type(value);
    let elem = elem.unwrap_or_else(|| infer(value));
    Ok((name.to_owned(), parse_scalar(value, elem)?))
}

fn parse_workgroups(s: &str) -> Result<[u32; 3], String> {
    let parts: Vec<&str> = s.split(',').collect();
    if parts.is_empty() || parts.len() > 3 {
        return Err(format!("expected X[,Y[,Z]], got `{s}`"));
    }
    let mut out = [1u32; 3];
    for (o, p) in out.iter_mut().zip(parts) {
        *o = p
            .trim()
            .parse()
            .map_err(|e| format!("`{p}` is not a workgroup count: {e}"))?;
    }
    Ok(out)
}

pub(crate) async fn input(call: Call, spec: &str) -> Result<Call> {
    let (name, value) = spec
        .split_once('=')
        .with_context(|| format!("expected NAME=@FILE or NAME=1,2,3, got `{spec}`"))?;
    let (value, elem) = split_type(value);
    if let Some(path) = value.strip_prefix('@') {
        let path = PathBuf::from(path);
        let elem = elem
            .or_else(|| {
                path.extension()
                    .and_then(|e| e.to_str())
                    .and_then(parse_type)
            })
            .with_context(|| {
                format!(
                    "say the element type of {}: name it .f32/.u32/.i32 or add :f32",
                    path.display()
                )
            })?;
        let bytes = tokio::fs::read(&path)
            .await
            .with_context(|| format!("reading {}", path.display()))?;
        if bytes.len() % elem.size() != 0 {
            bail!(
                "{} has {} bytes, not a whole number of {elem} values",
                path.display(),
                bytes.len()
            );
        }
        return Ok(call.input_bytes(name, elem, bytes));
    }
    let items: Vec<&str> = value.split(',').filter(|v| !v.trim().is_empty()).collect();
    let elem = elem.unwrap_or_else(|| {
        if items.iter().any(|v| infer(v) == ElemType::F32) {
            ElemType::F32
        } else if items.iter().any(|v| infer(v) == ElemType::I32) {
            ElemType::I32
        } else {
            ElemType::U32
        }
    });
    let mut bytes = Vec::with_capacity(items.len() * 4);
    for v in items {
        let s = parse_scalar(v, elem).map_err(anyhow::Error::msg)?;
        bytes.extend_from_slice(&s.to_le_bytes());
    }
    Ok(call.input_bytes(name, elem, bytes))
}

fn render(elem: ElemType, bytes: &[u8], show: usize) -> String {
    let n = bytes.len() / 4;
    let mut items: Vec<String> = bytes
        .chunks_exact(4)
        .take(show)
        .map(|c| {
            let b = [c[0], c[1], c[2], c[3]];
            match elem {
                ElemType::F32 => f32::from_le_bytes(b).to_string(),
                ElemType::U32 => u32::from_le_bytes(b).to_string(),
                ElemType::I32 => i32::from_le_bytes(b).to_string(),
            }
        })
        .collect();
    if n > show {
        items.push(format!("... ({} more)", n - show));
    }
    format!("[{}]", items.join(", "))
}

pub async fn run(a: CallArgs) -> Result<()> {
    let config = ClientConfig::from_pem_files(a.server, &a.server_name, &a.ca, &a.cert, &a.key)
        .await
        .context("reading the certificates")?;
    let client = Client::connect(config).await.with_context(|| {
        format!(
            "connecting to {} as {} (is the server up, and does it trust this certificate's CA?)",
            a.server,
            a.cert.display()
        )
    })?;
    let mut call = Call::new(&a.kernel);
    for (name, value) in &a.args {
        call = call.arg(name.clone(), *value);
    }
    for spec in &a.inputs {
        call = input(call, spec).await?;
    }
    if let Some(ms) = a.deadline_ms {
        call = call.deadline(Duration::from_millis(ms));
    }
    if let Some(wg) = a.workgroups {
        call = call.workgroups(wg);
    }
    let response = client
        .execute(call)
        .await
        .with_context(|| format!("calling `{}`", a.kernel))?;

    let mut written = Vec::new();
    for spec in &a.outs {
        let (name, path) = spec
            .split_once("=@")
            .with_context(|| format!("expected NAME=@FILE, got `{spec}`"))?;
        let out = response
            .outputs()
            .find(|o| o.name == name)
            .with_context(|| format!("the response has no output `{name}`"))?;
        tokio::fs::write(path, out.bytes)
            .await
            .with_context(|| format!("writing {path}"))?;
        written.push(name.to_owned());
        println!(
            "{name}: {}[{}] written to {path}",
            out.elem,
            out.bytes.len() / 4
        );
    }
    for out in response
        .outputs()
        .filter(|o| !written.iter().any(|w| w == o.name))
    {
        println!(
            "{}: {}[{}] = {}",
            out.name,
            out.elem,
            out.bytes.len() / 4,
            render(out.elem, out.bytes, a.show)
        );
    }
    let t = response.timings();
    let c = response.client_timings();
    let kernel = t
        .kernel_us
        .map(|k| format!(", of which the kernels {k} us"))
        .unwrap_or_default();
    println!(
        "timings: round trip {} us; server {} us (queued {} us, GPU {} us{kernel}, readback {} us)",
        super::micros(c.total),
        t.total_us,
        t.queued_us,
        t.gpu_us,
        t.readback_us
    );
    client.close().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_infer_types() {
        assert_eq!(parse_arg("a=2.0"), Ok(("a".into(), Scalar::F32(2.0))));
        assert_eq!(parse_arg("n=3"), Ok(("n".into(), Scalar::U32(3))));
        assert_eq!(parse_arg("k=-3"), Ok(("k".into(), Scalar::I32(-3))));
        assert_eq!(parse_arg("a=2:f32"), Ok(("a".into(), Scalar::F32(2.0))));
        assert!(parse_arg("a").is_err());
        assert!(parse_arg("n=x:u32").is_err());
        assert_eq!(parse_workgroups("4,2"), Ok([4, 2, 1]));
        assert!(parse_workgroups("1,2,3,4").is_err());
    }
}
