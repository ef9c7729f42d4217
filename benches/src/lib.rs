//! Scenarios shared by Quasar's criterion micro-benchmarks: representative
//! requests, built the way the SDK builds them.
//!
//! The benchmarks themselves live in `benches/`: `codec` measures encoding a
//! request header, validating a received one (rkyv checked access), and
//! checking it against a kernel's interface.

use quasar_transport::{BufferDesc, ElemType, NamedScalar, RequestHeader, Scalar};

/// A saxpy request over `n` elements.
pub fn saxpy_request(n: u64) -> RequestHeader {
    RequestHeader {
        kernel: "saxpy".into(),
        args: vec![NamedScalar {
            name: "a".into(),
            value: Scalar::F32(2.0),
        }],
        buffers: vec![
            BufferDesc {
                name: "x".into(),
                elem: ElemType::F32,
                len: n,
            },
            BufferDesc {
                name: "y".into(),
                elem: ElemType::F32,
                len: n,
            },
        ],
        timeout_us: Some(1_000_000),
        workgroups: None,
    }
}

/// A matmul request for (m x k) by (k x n).
pub fn matmul_request(m: u32, n: u32, k: u32) -> RequestHeader {
    let dim = |name: &str, v: u32| NamedScalar {
        name: name.into(),
        value: Scalar::U32(v),
    };
    RequestHeader {
        kernel: "matmul".into(),
        args: vec![dim("m", m), dim("n", n), dim("k", k)],
        buffers: vec![
            BufferDesc {
                name: "a".into(),
                elem: ElemType::F32,
                len: u64::from(m) * u64::from(k),
            },
            BufferDesc {
                name: "b".into(),
                elem: ElemType::F32,
                len: u64::from(k) * u64::from(n),
            },
        ],
        timeout_us: None,
        workgroups: None,
    }
}
