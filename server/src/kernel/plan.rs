//! Checking a request against a kernel's interface.
//!
//! [`plan`] is a plain function over the validated archive: it decides
//! whether a call may run and derives everything the GPU executor needs
//! (buffer lengths, where each input sits in the payload, the uniform block's
//! bytes, the workgroup counts, the response layout), so the executor does no
//! checking of its own and tests can exercise every refusal without a GPU.

use std::ops::Range;

use quasar_transport::wire::{ArchivedRequestHeader, PayloadLayout};
use quasar_transport::{ElemType, Limits, Scalar, StatusCode};

use super::rules::Vars;
use super::{BufferRole, KernelInterface};

/// What the device allows, copied from its limits at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCaps {
    /// `max_compute_workgroups_per_dimension`.
    pub max_workgroups_per_dim: u32,
    /// `max_storage_buffer_binding_size`, in bytes.
    pub max_storage_binding: u64,
    /// `max_buffer_size`, in bytes.
    pub max_buffer_size: u64,
}

/// Everything needed to run one call.
#[derive(Debug, Clone, PartialEq)]
pub struct CallPlan {
    /// Index of the kernel in the registry.
    pub kernel: usize,
    /// Element count of every buffer, in the interface's order.
    pub lens: Vec<u64>,
    /// Each sent buffer's interface index and byte range in the payload.
    pub sent: Vec<(usize, Range<usize>)>,
    /// The uniform block's bytes (empty if the kernel has none).
    pub params: Vec<u8>,
    /// Workgroup counts, one per stage.
    pub workgroups: Vec<[u32; 3]>,
    /// Interface indices of the returned buffers, in binding order.
    pub returned: Vec<usize>,
    /// Where each returned buffer sits in the response payload.
    pub response_layout: PayloadLayout,
}

impl CallPlan {
    /// Bytes of GPU memory the call's buffers occupy.
    pub fn buffer_bytes(&self) -> u64 {
        self.lens.iter().map(|l| l * 4).sum()
    }
}

/// Why a call was refused: a status code and a message for the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct PlanError {
    /// The status code sent back.
    pub code: StatusCode,
    /// The message sent back.
    pub message: String,
}

/// A client-chosen name as it appears in a message: at most 64 characters,
/// so an error reply never grows past what the client accepts. Formatted
/// only when a message is written: checking a call allocates nothing.
pub(crate) fn shown(name: &str) -> Shown<'_> {
    Shown(name)
}

/// See [`shown`].
pub(crate) struct Shown<'a>(&'a str);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const MAX: usize = 64;
        match self.0.char_indices().nth(MAX) {
            None => f.write_str(self.0),
            Some((end, _)) => write!(f, "{}...", &self.0[..end]),
        }
    }
}

fn invalid(message: impl Into<String>) -> PlanError {
    PlanError {
        code: StatusCode::InvalidArgument,
        message: message.into(),
    }
}

/// Checks an echo request (whose payload is `payload_len` bytes): buffers
/// within the limit and laid out exactly as the payload, no arguments. The
/// response carries the same buffers, so its description is returned.
///
/// # Errors
/// [`PlanError`] with `InvalidArgument`.
pub fn plan_echo(
    req: &ArchivedRequestHeader,
    payload_len: u64,
    limits: &Limits,
) -> Result<Vec<quasar_transport::BufferDesc>, PlanError> {
    if req.buffers.len() > limits.max_buffers {
        return Err(invalid(format!(
            "{} buffers exceed the limit of {}",
            req.buffers.len(),
            limits.max_buffers
        )));
    }
    if !req.args.is_empty() {
        return Err(invalid("the echo takes no arguments"));
    }
    // Only the total matters here: no slots kept.
    let total = PayloadLayout::total_of(
        req.buffers
            .iter()
            .map(|b| (b.name.as_str(), b.elem.to_native(), b.len.to_native())),
    )
    .map_err(|e| invalid(e.to_string()))?;
    PayloadLayout::check_total(total, payload_len).map_err(|e| invalid(e.to_string()))?;
    Ok(req
        .buffers
        .iter()
        .map(|b| quasar_transport::BufferDesc {
            name: b.name.as_str().to_owned(),
            elem: b.elem.to_native(),
            len: b.len.to_native(),
        })
        .collect())
}

/// Checks `req` (whose payload is `payload_len` bytes) against `k`.
///
/// # Errors
/// [`PlanError`] with `InvalidArgument` for anything that does not match the
/// kernel (naming the buffer, argument or rule), or `ResourceExhausted` for
/// sizes over the device's or the protocol's limits.
pub fn plan(
    kernel: usize,
    k: &KernelInterface,
    req: &ArchivedRequestHeader,
    payload_len: u64,
    limits: &Limits,
    caps: &DeviceCaps,
) -> Result<CallPlan, PlanError> {
    let name = &k.name;
    if req.buffers.len() > limits.max_buffers {
        return Err(invalid(format!(
            "{} buffers exceed the limit of {}",
            req.buffers.len(),
            limits.max_buffers
        )));
    }
    if req.args.len() > limits.max_args {
        return Err(invalid(format!(
            "{} arguments exceed the limit of {}",
            req.args.len(),
            limits.max_args
        )));
    }

    // Buffers the client sent: each must be a distinct input of the kernel,
    // of the right type and non-empty.
    let layout = PayloadLayout::new(
        req.buffers
            .iter()
            .map(|b| (b.name.as_str(), b.elem.to_native(), b.len.to_native())),
    )
    .map_err(|e| invalid(e.to_string()))?;
    layout
        .check_len(payload_len)
        .map_err(|e| invalid(e.to_string()))?;
    let mut lens = vec![0u64; k.buffers.len()];
    let mut sent = Vec::with_capacity(req.buffers.len());
    for (desc, slot) in req.buffers.iter().zip(layout.slots()) {
        let bname = &shown(desc.name.as_str());
        let idx = k
            .buffers
            .iter()
            .position(|b| b.name == desc.name.as_str())
            .ok_or_else(|| invalid(format!("kernel `{name}` has no buffer `{bname}`")))?;
        let b = &k.buffers[idx];
        if !b.role.is_sent() {
            return Err(invalid(format!(
                "buffer `{bname}` of kernel `{name}` is an {} allocated by the server; do not send it",
                b.role.name()
            )));
        }
        if sent.iter().any(|(i, _)| *i == idx) {
            return Err(invalid(format!("buffer `{bname}` is sent twice")));
        }
        let elem = desc.elem.to_native();
        if elem != b.elem {
            return Err(invalid(format!(
                "buffer `{bname}` of kernel `{name}` holds {}, not {elem}",
                b.elem
            )));
        }
        let len = desc.len.to_native();
        if len == 0 {
            return Err(invalid(format!("buffer `{bname}` is empty")));
        }
        check_size(bname, len, caps)?;
        lens[idx] = len;
        sent.push((idx, slot.clone()));
    }
    if let Some(missing) = k
        .buffers
        .iter()
        .enumerate()
        .find(|(i, b)| b.role.is_sent() && lens[*i] == 0)
    {
        return Err(invalid(format!(
            "kernel `{name}` needs buffer `{}` ({}[])",
            missing.1.name, missing.1.elem
        )));
    }

    // Scalar arguments: exactly the members of the uniform block.
    let mut vars = Vars::default();
    let mut params = Vec::new();
    if let Some(block) = &k.params {
        params = vec![0u8; block.size as usize];
        for m in &block.members {
            let arg = req
                .args
                .iter()
                .find(|a| a.name.as_str() == m.name)
                .ok_or_else(|| {
                    invalid(format!(
                        "kernel `{name}` needs scalar argument `{}` ({})",
                        m.name, m.elem
                    ))
                })?;
            let value = arg.value.to_native();
            if value.elem() != m.elem {
                return Err(invalid(format!(
                    "argument `{}` of kernel `{name}` is {}, not {}",
                    m.name,
                    m.elem,
                    value.elem()
                )));
            }
            let at = m.offset as usize;
            if let Some(dst) = params.get_mut(at..at + 4) {
                dst.copy_from_slice(&value.to_le_bytes());
            }
            match value {
                Scalar::F32(v) => vars.set_float(&m.name, f64::from(v)),
                Scalar::U32(v) => vars.set_int(&m.name, i64::from(v)),
                Scalar::I32(v) => vars.set_int(&m.name, i64::from(v)),
            }
        }
    }
    for (i, a) in req.args.iter().enumerate() {
        let aname = &shown(a.name.as_str());
        let known = k
            .params
            .iter()
            .flat_map(|p| &p.members)
            .any(|m| m.name == a.name.as_str());
        if !known {
            return Err(invalid(format!(
                "kernel `{name}` has no argument `{aname}`"
            )));
        }
        if req.args.iter().take(i).any(|b| b.name == a.name) {
            return Err(invalid(format!("argument `{aname}` is given twice")));
        }
    }

    // Derived lengths, then preconditions, then dispatch sizes.
    for (idx, b) in k.buffers.iter().enumerate() {
        if b.role.is_sent() {
            vars.set_int(format!("len_{}", b.name), len_i64(lens[idx]));
        }
    }
    vars.set_int("max_wg", i64::from(caps.max_workgroups_per_dim));
    for &idx in &k.derived_order {
        let b = &k.buffers[idx];
        let Some(rule) = &b.len_rule else { continue };
        let len = rule.eval_count(&vars).map_err(|e| invalid(e.to_string()))?;
        if len == 0 {
            return Err(invalid(format!(
                "{} buffer `{}` would be empty (rule `{}`)",
                b.role.name(),
                b.name,
                rule.source()
            )));
        }
        check_size(&b.name, len, caps)?;
        lens[idx] = len;
        vars.set_int(format!("len_{}", b.name), len_i64(len));
    }
    for r in &k.requires {
        let ok = r
            .rule
            .eval_bool(&vars)
            .map_err(|e| invalid(e.to_string()))?;
        if !ok {
            return Err(invalid(format!("kernel `{name}`: {}", r.message)));
        }
    }
    let max = caps.max_workgroups_per_dim;
    let workgroups = match req.workgroups.as_ref() {
        Some(explicit) => {
            // Only kernels that say they are correct for any count accept
            // one: anything else could return wrong results with OK.
            if !k.flexible_workgroups {
                return Err(invalid(format!(
                    "kernel `{name}` does not accept an explicit workgroup count (it is not declared `flexible_workgroups`)"
                )));
            }
            if explicit[1].to_native() != 1 || explicit[2].to_native() != 1 {
                return Err(invalid(format!(
                    "kernel `{name}` takes a 1-D workgroup count: y and z must be 1"
                )));
            }
            let dims = [
                u64::from(explicit[0].to_native()),
                u64::from(explicit[1].to_native()),
                u64::from(explicit[2].to_native()),
            ];
            vec![check_dims(&k.stages[0].entry_point, dims, max)?]
        }
        None => {
            let mut out = Vec::with_capacity(k.stages.len());
            for s in &k.stages {
                vars.set_int("wg_x", i64::from(s.workgroup_size[0]));
                vars.set_int("wg_y", i64::from(s.workgroup_size[1]));
                vars.set_int("wg_z", i64::from(s.workgroup_size[2]));
                let dims = s
                    .workgroups
                    .eval_dims(&vars)
                    .map_err(|e| invalid(e.to_string()))?;
                out.push(check_dims(&s.entry_point, dims, max)?);
            }
            out
        }
    };

    let returned: Vec<usize> = (0..k.buffers.len())
        .filter(|&i| k.buffers[i].role.is_returned())
        .collect();
    let response_layout = PayloadLayout::new(
        returned
            .iter()
            .map(|&i| (k.buffers[i].name.as_str(), k.buffers[i].elem, lens[i])),
    )
    .map_err(|e| invalid(e.to_string()))?;
    if response_layout.total() as u64 > limits.max_payload_len {
        return Err(PlanError {
            code: StatusCode::ResourceExhausted,
            message: format!(
                "the response would be {} bytes, over the limit of {}",
                response_layout.total(),
                limits.max_payload_len
            ),
        });
    }
    debug_assert!(
        k.buffers
            .iter()
            .zip(&lens)
            .all(|(b, l)| *l > 0 || b.role == BufferRole::Scratch && b.len_rule.is_none())
    );
    Ok(CallPlan {
        kernel,
        lens,
        sent,
        params,
        workgroups,
        returned,
        response_layout,
    })
}

fn len_i64(len: u64) -> i64 {
    i64::try_from(len).unwrap_or(i64::MAX)
}

fn check_size(
    buffer: &dyn std::fmt::Display,
    len: u64,
    caps: &DeviceCaps,
) -> Result<(), PlanError> {
    let bytes = len.saturating_mul(ElemType::F32.size() as u64);
    let max = caps.max_storage_binding.min(caps.max_buffer_size);
    if bytes > max {
        return Err(PlanError {
            code: StatusCode::ResourceExhausted,
            message: format!(
                "buffer `{buffer}` of {bytes} bytes exceeds the device's limit of {max} bytes per buffer"
            ),
        });
    }
    Ok(())
}

fn check_dims(entry: &str, dims: [u64; 3], max: u32) -> Result<[u32; 3], PlanError> {
    let mut out = [0u32; 3];
    for (o, d) in out.iter_mut().zip(dims) {
        if d == 0 || d > u64::from(max) {
            return Err(invalid(format!(
                "stage `{entry}` would dispatch {dims:?} workgroups; each dimension must be 1 to {max}"
            )));
        }
        *o = d as u32;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::KernelInterface;
    use quasar_transport::wire::{access_request, encode_request};
    use quasar_transport::{BufferDesc, NamedScalar, RequestHeader};

    const CAPS: DeviceCaps = DeviceCaps {
        max_workgroups_per_dim: 65535,
        max_storage_binding: 1 << 27,
        max_buffer_size: 1 << 28,
    };

    fn kernel(name: &str) -> KernelInterface {
        let s = quasar_shaders::SHIPPED
            .iter()
            .find(|k| k.name == name)
            .expect("shipped");
        KernelInterface::from_wgsl(s.name, s.source)
            .expect("reflect")
            .interface
    }

    fn buf(name: &str, elem: ElemType, len: u64) -> BufferDesc {
        BufferDesc {
            name: name.into(),
            elem,
            len,
        }
    }

    fn run(k: &KernelInterface, h: &RequestHeader) -> Result<CallPlan, PlanError> {
        let bytes = encode_request(h).expect("encode");
        let archived = access_request(&bytes).expect("access");
        let payload = PayloadLayout::new(h.buffers.iter().map(|b| (b.name.as_str(), b.elem, b.len)))
            .expect("layout")
            .total() as u64;
        plan(0, k, archived, payload, &Limits::default(), &CAPS)
    }

    #[test]
    fn the_echo_plan_checks_the_payload_length_against_its_buffers() {
        let h = RequestHeader {
            kernel: quasar_transport::ECHO_KERNEL.into(),
            args: Vec::new(),
            buffers: vec![buf("a", ElemType::F32, 3), buf("b", ElemType::U32, 2)],
            timeout_us: None,
            workgroups: None,
        };
        let bytes = encode_request(&h).expect("encode");
        let archived = access_request(&bytes).expect("access");
        let limits = Limits::default();
        // 12 bytes, padded to 16, then 8.
        let back = plan_echo(archived, 24, &limits).expect("planned");
        assert_eq!(back, h.buffers);
        for wrong in [0, 20, 23, 25] {
            let e = plan_echo(archived, wrong, &limits).expect_err("wrong length");
            assert_eq!(e.code, StatusCode::InvalidArgument);
            assert!(e.message.contains("24"), "{}", e.message);
        }
    }

    fn saxpy(n: u64) -> RequestHeader {
        RequestHeader {
            kernel: "saxpy".into(),
            args: vec![NamedScalar {
                name: "a".into(),
                value: Scalar::F32(2.0),
            }],
            buffers: vec![buf("x", ElemType::F32, n), buf("y", ElemType::F32, n)],
            timeout_us: None,
            workgroups: None,
        }
    }

    #[test]
    fn saxpy_plans() {
        let p = run(&kernel("saxpy"), &saxpy(1000)).expect("plan");
        assert_eq!(p.workgroups, vec![[4, 1, 1]]);
        assert_eq!(p.params, 2.0f32.to_le_bytes().to_vec());
        assert_eq!(p.response_layout.total(), 4000);
        // Capped at the device limit for very long inputs (grid-stride loop).
        let p = run(&kernel("saxpy"), &saxpy(20_000_000)).expect("plan");
        assert_eq!(p.workgroups, vec![[65535, 1, 1]]);
    }

    #[test]
    fn mismatches_name_what_is_wrong() {
        let k = kernel("saxpy");
        let mut h = saxpy(10);
        h.buffers[1].len = 11;
        assert!(
            run(&k, &h)
                .expect_err("len")
                .message
                .contains("same length")
        );

        let mut h = saxpy(10);
        h.buffers[0].elem = ElemType::U32;
        assert!(
            run(&k, &h)
                .expect_err("type")
                .message
                .contains("holds f32, not u32")
        );

        let mut h = saxpy(10);
        h.args.clear();
        assert!(
            run(&k, &h)
                .expect_err("arg")
                .message
                .contains("needs scalar argument `a`")
        );

        let mut h = saxpy(10);
        h.args[0].value = Scalar::U32(1);
        assert!(
            run(&k, &h)
                .expect_err("arg type")
                .message
                .contains("argument `a`")
        );

        let mut h = saxpy(10);
        h.buffers.pop();
        assert!(
            run(&k, &h)
                .expect_err("missing")
                .message
                .contains("needs buffer `y`")
        );

        let mut h = saxpy(10);
        h.buffers.push(buf("z", ElemType::F32, 1));
        assert!(
            run(&k, &h)
                .expect_err("extra")
                .message
                .contains("no buffer `z`")
        );

        let mut h = saxpy(10);
        h.buffers[1].name = "x".into();
        assert!(
            run(&k, &h)
                .expect_err("twice")
                .message
                .contains("sent twice")
        );

        let mut h = saxpy(0);
        h.buffers[1].len = 0;
        assert!(run(&k, &h).expect_err("empty").message.contains("empty"));

        let mut h = saxpy(10);
        h.args.push(NamedScalar {
            name: "b".into(),
            value: Scalar::F32(1.0),
        });
        assert!(
            run(&k, &h)
                .expect_err("unknown arg")
                .message
                .contains("no argument `b`")
        );

        let mut h = saxpy(10);
        h.workgroups = Some([0, 1, 1]);
        assert!(
            run(&k, &h)
                .expect_err("wg")
                .message
                .contains("each dimension")
        );

        let h = saxpy(1 << 26);
        assert_eq!(
            run(&k, &h).expect_err("size").code,
            StatusCode::ResourceExhausted
        );
    }

    #[test]
    fn payload_length_must_match() {
        let k = kernel("saxpy");
        let h = saxpy(10);
        let bytes = encode_request(&h).expect("encode");
        let archived = access_request(&bytes).expect("access");
        let err = plan(0, &k, archived, 79, &Limits::default(), &CAPS).expect_err("len");
        assert!(err.message.contains("payload is 79 bytes"), "{err}");
    }

    #[test]
    fn derived_lengths_and_multi_stage() {
        let k = kernel("prefix_sum");
        let h = RequestHeader {
            kernel: "prefix_sum".into(),
            args: vec![],
            buffers: vec![buf("input", ElemType::U32, 1 << 24)],
            timeout_us: None,
            workgroups: None,
        };
        let p = run(&k, &h).expect("plan");
        assert_eq!(p.workgroups.len(), 5);
        assert_eq!(p.workgroups[0], [16384, 1, 1]);
        let sums0 = k
            .buffers
            .iter()
            .position(|b| b.name == "sums0")
            .expect("sums0");
        assert_eq!(p.lens[sums0], 16384);
        let mut h2 = h.clone();
        h2.workgroups = Some([1, 1, 1]);
        assert!(
            run(&k, &h2)
                .expect_err("explicit")
                .message
                .contains("flexible_workgroups")
        );

        let k = kernel("matmul");
        let dims = |m, n, kk| {
            vec![
                NamedScalar {
                    name: "m".into(),
                    value: Scalar::U32(m),
                },
                NamedScalar {
                    name: "n".into(),
                    value: Scalar::U32(n),
                },
                NamedScalar {
                    name: "k".into(),
                    value: Scalar::U32(kk),
                },
            ]
        };
        let h = RequestHeader {
            kernel: "matmul".into(),
            args: dims(3, 5, 7),
            buffers: vec![buf("a", ElemType::F32, 21), buf("b", ElemType::F32, 35)],
            timeout_us: None,
            workgroups: None,
        };
        let p = run(&k, &h).expect("plan");
        assert_eq!(p.workgroups, vec![[1, 1, 1]]);
        assert_eq!(p.response_layout.total(), 15 * 4);
        let mut explicit = h.clone();
        explicit.workgroups = Some([1, 1, 1]);
        assert!(run(&k, &explicit).is_err(), "matmul is not grid-stride");
        let mut bad = h.clone();
        bad.args = dims(4, 5, 7);
        assert!(run(&k, &bad).expect_err("dims").message.contains("m*k"));
        let mut huge = h;
        huge.args = dims(1, 4_000_000_000, 21);
        assert!(run(&k, &huge).is_err());
    }
}
