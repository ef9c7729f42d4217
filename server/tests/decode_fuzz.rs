//! Property-based fuzzing of everything that reads bytes from the network:
//! the frame prefix, the rkyv header archive (checked access), and request
//! checking against every shipped kernel. Random and mutated inputs must
//! produce a value or an error, never a panic, and accepted requests must
//! respect their invariants.
//!
//! cargo-fuzz needs a nightly toolchain this project does not have, so this
//! is a proptest harness. CI runs it with the default case count (bounded,
//! seconds); `PROPTEST_CASES=1000000 cargo test -p quasar-server --test
//! decode_fuzz --release` runs longer. A failure proptest finds is saved
//! under `proptest-regressions/` and replayed first on every later run:
//! commit that file with the fix.

#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used)]

use proptest::prelude::*;
use quasar_server::kernel::KernelInterface;
use quasar_server::kernel::plan::{DeviceCaps, plan};
use quasar_transport::frame::{FrameKind, PREFIX_LEN, Prefix};
use quasar_transport::wire::{PayloadLayout, access_request, encode_request};
use quasar_transport::{BufferDesc, ElemType, Limits, NamedScalar, Payload, RequestHeader, Scalar};

const CAPS: DeviceCaps = DeviceCaps {
    max_workgroups_per_dim: 65535,
    max_storage_binding: 1 << 27,
    max_buffer_size: 1 << 28,
};

fn kernels() -> Vec<KernelInterface> {
    quasar_shaders::SHIPPED
        .iter()
        .map(|k| {
            KernelInterface::from_wgsl(k.name, k.source)
                .expect("reflect")
                .interface
        })
        .collect()
}

fn names() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("x".to_owned()),
        Just("y".to_owned()),
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just("input".to_owned()),
        Just("values".to_owned()),
        Just("m".to_owned()),
        Just("n".to_owned()),
        Just("k".to_owned()),
        Just("num_bins".to_owned()),
        Just("bin_width".to_owned()),
        Just("out".to_owned()),
        "[a-z_]{0,12}",
    ]
}

fn elem() -> impl Strategy<Value = ElemType> {
    prop_oneof![
        Just(ElemType::F32),
        Just(ElemType::U32),
        Just(ElemType::I32)
    ]
}

fn scalar() -> impl Strategy<Value = Scalar> {
    prop_oneof![
        any::<f32>().prop_map(Scalar::F32),
        any::<u32>().prop_map(Scalar::U32),
        any::<i32>().prop_map(Scalar::I32),
        (0u32..5000).prop_map(Scalar::U32),
    ]
}

fn len() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..5000, any::<u64>(), Just(1u64 << 26), Just(u64::MAX)]
}

fn request() -> impl Strategy<Value = RequestHeader> {
    let kernel = prop_oneof![
        Just("saxpy"),
        Just("add"),
        Just("mul"),
        Just("reduce_sum"),
        Just("matmul"),
        Just("prefix_sum"),
        Just("histogram"),
        Just("copy"),
        Just("nope"),
    ]
    .prop_map(String::from);
    let args = prop::collection::vec(
        (names(), scalar()).prop_map(|(name, value)| NamedScalar { name, value }),
        0..5,
    );
    let buffers = prop::collection::vec(
        (names(), elem(), len()).prop_map(|(name, elem, len)| BufferDesc { name, elem, len }),
        0..5,
    );
    let workgroups = prop::option::of(prop::array::uniform3(prop_oneof![0u32..4, any::<u32>()]));
    let timeout = prop::option::of(any::<u64>());
    (kernel, args, buffers, timeout, workgroups).prop_map(
        |(kernel, args, buffers, timeout_us, workgroups)| RequestHeader {
            kernel,
            args,
            buffers,
            timeout_us,
            workgroups,
        },
    )
}

/// Checks a request against the kernel it names the way the server does,
/// and the invariants of an accepted plan.
fn check(kernels: &[KernelInterface], bytes: &[u8], payload_len: u64) {
    let limits = Limits::default();
    let Ok(header) = access_request(bytes) else {
        return;
    };
    let Some((i, k)) = kernels
        .iter()
        .enumerate()
        .find(|(_, k)| k.name == header.kernel.as_str())
    else {
        return;
    };
    if let Ok(p) = plan(i, k, header, payload_len, &limits, &CAPS) {
        for (idx, range) in &p.sent {
            assert!(range.end as u64 <= payload_len, "input past the payload");
            assert_eq!((range.end - range.start) as u64, p.lens[*idx] * 4);
        }
        for wg in &p.workgroups {
            assert!(
                wg.iter()
                    .all(|d| (1..=CAPS.max_workgroups_per_dim).contains(d))
            );
        }
        assert!(
            p.lens
                .iter()
                .all(|l| *l >= 1 && l * 4 <= CAPS.max_storage_binding)
        );
        assert!(p.response_layout.total() as u64 <= limits.max_payload_len);
        assert_eq!(p.workgroups.len(), k.stages.len());
    }
}

fn aligned(bytes: &[u8]) -> Payload {
    let mut v = Payload::new();
    v.extend_from_slice(bytes);
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn prefix_decode_never_panics(bytes in any::<[u8; PREFIX_LEN]>()) {
        let limits = Limits::default();
        if let Ok(p) = Prefix::decode(&bytes, FrameKind::Request, &limits) {
            prop_assert!(p.header_len >= 1 && p.header_len <= limits.max_header_len);
            prop_assert!(p.payload_len <= limits.max_payload_len);
        }
    }

    #[test]
    fn random_bytes_are_never_read_unchecked(bytes in prop::collection::vec(any::<u8>(), 0..1024)) {
        let kernels = kernels();
        check(&kernels, &aligned(&bytes), bytes.len() as u64);
    }

    #[test]
    fn structured_requests_plan_or_fail_cleanly(req in request(), slack in 0u64..64) {
        let kernels = kernels();
        let bytes = encode_request(&req).expect("encode");
        let exact = PayloadLayout::new(req.buffers.iter().map(|b| (b.name.as_str(), b.elem, b.len)))
            .map(|l| l.total() as u64)
            .unwrap_or(u64::MAX);
        check(&kernels, &bytes, exact);
        check(&kernels, &bytes, exact.wrapping_add(slack));
    }

    #[test]
    fn mutated_archives_are_rejected_or_checked(
        req in request(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        cut in any::<prop::sample::Index>(),
    ) {
        let kernels = kernels();
        let mut bytes = encode_request(&req).expect("encode").to_vec();
        for (at, value) in flips {
            let i = at.index(bytes.len());
            bytes[i] ^= value;
        }
        check(&kernels, &aligned(&bytes), 4096);
        let keep = cut.index(bytes.len());
        check(&kernels, &aligned(&bytes[..keep]), 4096);
    }
}
