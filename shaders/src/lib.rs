//! Quasar's shipped kernels: WGSL sources, CPU references, and sample calls.
//!
//! The WGSL files in `wgsl/` are the source of truth for each kernel's
//! interface: the server discovers buffers, element types and scalar
//! arguments from them by reflection, and reads dispatch rules from their
//! `// quasar:` directives (see `README.md` beside this crate). Nothing here
//! repeats a binding number.
//!
//! # Layout
//! - [`SHIPPED`]: the embedded sources, compiled into the server.
//! - [`reference`](mod@reference): plain CPU implementations, the ground truth of tests.
//! - [`sample`]: random inputs for a kernel at a given size, and a checker
//!   that compares a call's outputs with the reference (exact for integer
//!   kernels, a stated tolerance for floats).

pub mod reference;
pub mod sample;

pub use sample::{HostBuffer, Mismatch, Sample};

/// A kernel compiled into the server.
#[derive(Debug, Clone, Copy)]
pub struct ShippedKernel {
    /// The kernel's name (its file stem).
    pub name: &'static str,
    /// Its WGSL source.
    pub source: &'static str,
}

/// Every shipped kernel, in a stable order.
pub const SHIPPED: &[ShippedKernel] = &[
    ShippedKernel {
        name: "saxpy",
        source: include_str!("../wgsl/saxpy.wgsl"),
    },
    ShippedKernel {
        name: "add",
        source: include_str!("../wgsl/add.wgsl"),
    },
    ShippedKernel {
        name: "mul",
        source: include_str!("../wgsl/mul.wgsl"),
    },
    ShippedKernel {
        name: "reduce_sum",
        source: include_str!("../wgsl/reduce_sum.wgsl"),
    },
    ShippedKernel {
        name: "matmul",
        source: include_str!("../wgsl/matmul.wgsl"),
    },
    ShippedKernel {
        name: "prefix_sum",
        source: include_str!("../wgsl/prefix_sum.wgsl"),
    },
    ShippedKernel {
        name: "histogram",
        source: include_str!("../wgsl/histogram.wgsl"),
    },
    ShippedKernel {
        name: "copy",
        source: include_str!("../wgsl/copy.wgsl"),
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    /// A broken shader fails here, without a GPU.
    #[test]
    fn every_shipped_shader_parses_and_validates_with_naga() {
        for k in SHIPPED {
            let module = naga::front::wgsl::parse_str(k.source)
                .unwrap_or_else(|e| panic!("{}: {}", k.name, e.emit_to_string(k.source)));
            naga::valid::Validator::new(
                naga::valid::ValidationFlags::all(),
                naga::valid::Capabilities::default(),
            )
            .validate(&module)
            .unwrap_or_else(|e| panic!("{}: {}", k.name, e.emit_to_string(k.source)));
        }
    }

    #[test]
    fn names_are_unique_and_every_kernel_has_a_sample() {
        let mut names: Vec<_> = SHIPPED.iter().map(|k| k.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), SHIPPED.len());
        let mut rng = sample::seeded(1);
        for k in SHIPPED {
            assert!(
                Sample::for_kernel(k.name, 100, &mut rng).is_some(),
                "{}",
                k.name
            );
        }
    }
}
