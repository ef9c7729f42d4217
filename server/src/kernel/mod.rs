//! Kernels: WGSL compute shaders whose interface is discovered by reflection.
//!
//! A kernel is one WGSL file. Its storage buffers, their element types and
//! access modes, and its uniform block of scalar arguments are read from the
//! shader with naga; `// quasar:` directives in the file add what WGSL cannot
//! say (how long server-allocated buffers are, which entry points run in
//! which order with how many workgroups, and preconditions). The grammar is
//! documented in `shaders/README.md`.
//!
//! # Layout
//! - this file: [`KernelInterface`] and [`KernelInterface::from_wgsl`].
//! - [`rules`]: the integer expressions of the directives.
//! - [`plan`]: checks a request against an interface and derives everything
//!   the GPU executor needs ([`plan::CallPlan`]), as a plain function.

pub mod fuse;
pub mod plan;
pub mod rules;

use naga::{AddressSpace, ArraySize, ScalarKind, ShaderStage, StorageAccess, TypeInner};
use quasar_transport::ElemType;
use thiserror::Error;

use self::rules::{Rule, RuleError};

/// What a storage buffer is for, from the client's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BufferRole {
    /// `var<storage, read>`: sent by the client, not returned.
    Input,
    /// `var<storage, read_write>` without a directive: sent by the client and
    /// returned after the kernel ran.
    InOut,
    /// Declared with `// quasar: output`: allocated zeroed by the server,
    /// returned.
    Output,
    /// Declared with `// quasar: scratch`: allocated zeroed by the server,
    /// not returned.
    Scratch,
}

impl BufferRole {
    /// True if the client sends this buffer.
    pub fn is_sent(self) -> bool {
        matches!(self, Self::Input | Self::InOut)
    }

    /// True if the response carries this buffer.
    pub fn is_returned(self) -> bool {
        matches!(self, Self::InOut | Self::Output)
    }

    /// Lower-case name used in logs and docs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::InOut => "inout",
            Self::Output => "output",
            Self::Scratch => "scratch",
        }
    }
}

/// One storage buffer binding.
#[derive(Debug, Clone)]
pub struct BufferBinding {
    /// The WGSL variable name.
    pub name: String,
    /// `@binding(n)` in group 0.
    pub binding: u32,
    /// Element type of the runtime-sized array.
    pub elem: ElemType,
    /// What the buffer is for.
    pub role: BufferRole,
    /// Length in elements, for outputs and scratch buffers.
    pub len_rule: Option<Rule>,
}

/// One member of the uniform block of scalar arguments.
#[derive(Debug, Clone)]
pub struct ParamMember {
    /// Member name: the argument's name.
    pub name: String,
    /// Its type.
    pub elem: ElemType,
    /// Byte offset in the block, as laid out by WGSL.
    pub offset: u32,
}

/// The uniform block of scalar arguments.
#[derive(Debug, Clone)]
pub struct ParamsBlock {
    /// The WGSL variable name.
    pub name: String,
    /// `@binding(n)` in group 0.
    pub binding: u32,
    /// Size of the block in bytes.
    pub size: u32,
    /// Members in declaration order.
    pub members: Vec<ParamMember>,
}

/// One dispatch of an entry point.
#[derive(Debug, Clone)]
pub struct Stage {
    /// The entry point's name.
    pub entry_point: String,
    /// Its `@workgroup_size`.
    pub workgroup_size: [u32; 3],
    /// How many workgroups to dispatch.
    pub workgroups: Rule,
}

/// A precondition on a call.
#[derive(Debug, Clone)]
pub struct Require {
    /// Must evaluate to true.
    pub rule: Rule,
    /// What the caller is told when it does not.
    pub message: String,
}

/// Everything the server knows about a kernel, from its WGSL alone.
#[derive(Debug, Clone)]
pub struct KernelInterface {
    /// Kernel name.
    pub name: String,
    /// Storage buffers, by binding number.
    pub buffers: Vec<BufferBinding>,
    /// The scalar arguments, if the kernel takes any.
    pub params: Option<ParamsBlock>,
    /// Dispatches, in order.
    pub stages: Vec<Stage>,
    /// Preconditions, in order.
    pub requires: Vec<Require>,
    /// Order in which output and scratch lengths are computed (indices into
    /// `buffers`), so that a later rule may use an earlier length.
    pub derived_order: Vec<usize>,
    /// Declared `// quasar: flexible_workgroups`: the single stage is correct
    /// for any 1-D workgroup count (a grid-stride loop), so callers may set it.
    pub flexible_workgroups: bool,
}

/// Why a kernel could not be loaded.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum KernelError {
    /// The WGSL does not parse.
    #[error("kernel `{kernel}`: WGSL parse error:\n{message}")]
    Parse {
        /// Kernel name.
        kernel: String,
        /// naga's report, with source context.
        message: String,
    },
    /// The WGSL parses but does not validate.
    #[error("kernel `{kernel}`: WGSL validation error:\n{message}")]
    Validate {
        /// Kernel name.
        kernel: String,
        /// naga's report.
        message: String,
    },
    /// The shader uses something Quasar cannot bind.
    #[error("kernel `{kernel}`: {detail}")]
    Unsupported {
        /// Kernel name.
        kernel: String,
        /// What is not supported.
        detail: String,
    },
    /// A `// quasar:` directive is malformed.
    #[error("kernel `{kernel}`, line {line}: {detail}")]
    Directive {
        /// Kernel name.
        kernel: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        detail: String,
    },
    /// A rule does not parse.
    #[error("kernel `{kernel}`: {source}")]
    Rule {
        /// Kernel name.
        kernel: String,
        /// The rule error.
        #[source]
        source: RuleError,
    },
}

/// A parsed kernel: its interface and the naga module, ready to compile.
#[derive(Debug)]
pub struct ParsedKernel {
    /// The interface.
    pub interface: KernelInterface,
    /// The validated naga module, handed to wgpu without parsing again.
    pub module: naga::Module,
}

const DIRECTIVE: &str = "// quasar:";

impl KernelInterface {
    /// Parses, validates and reflects a WGSL kernel.
    ///
    /// # Errors
    /// [`KernelError`] naming the kernel and what is wrong.
    pub fn from_wgsl(name: &str, source: &str) -> Result<ParsedKernel, KernelError> {
        let module = naga::front::wgsl::parse_str(source).map_err(|e| KernelError::Parse {
            kernel: name.to_owned(),
            message: e.emit_to_string(source),
        })?;
        validator()
            .validate(&module)
            .map_err(|e| KernelError::Validate {
                kernel: name.to_owned(),
                message: e.emit_to_string(source),
            })?;
        let interface = reflect(name, &module, source)?;
        Ok(ParsedKernel { interface, module })
    }

    /// The buffer bound under `name`.
    pub fn buffer(&self, name: &str) -> Option<&BufferBinding> {
        self.buffers.iter().find(|b| b.name == name)
    }

    /// A one-line summary for logs: `saxpy(a: f32; x: f32[] in, y: f32[] inout)`.
    pub fn signature(&self) -> String {
        let args = self
            .params
            .iter()
            .flat_map(|p| &p.members)
            .map(|m| format!("{}: {}", m.name, m.elem))
            .collect::<Vec<_>>()
            .join(", ");
        let bufs = self
            .buffers
            .iter()
            .map(|b| format!("{}: {}[] {}", b.name, b.elem, b.role.name()))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "{}({args}; {bufs}) in {} stage(s)",
            self.name,
            self.stages.len()
        )
    }
}

/// The validator a module is held to as the server serves it: every check
/// naga has, and its default capabilities (no subgroups, no f64), for a
/// parsed kernel and for its fused rewrite alike.
fn validator() -> naga::valid::Validator {
    naga::valid::Validator::new(
        naga::valid::ValidationFlags::all(),
        naga::valid::Capabilities::default(),
    )
}

fn reflect(
    name: &str,
    module: &naga::Module,
    source: &str,
) -> Result<KernelInterface, KernelError> {
    let unsupported = |detail: String| KernelError::Unsupported {
        kernel: name.to_owned(),
        detail,
    };
    let mut buffers = Vec::new();
    let mut params: Option<ParamsBlock> = None;
    for (_, var) in module.global_variables.iter() {
        let Some(binding) = &var.binding else {
            continue;
        };
        let var_name = var.name.clone().unwrap_or_default();
        if binding.group != 0 {
            return Err(unsupported(format!(
                "`{var_name}` is in bind group {}; kernels use group 0 only",
                binding.group
            )));
        }
        let ty = &module.types[var.ty];
        match var.space {
            AddressSpace::Storage { access } => {
                let elem = match &ty.inner {
                    TypeInner::Array {
                        base,
                        size: ArraySize::Dynamic,
                        ..
                    } => elem_of(&module.types[*base].inner),
                    _ => None,
                }
                .ok_or_else(|| {
                    unsupported(format!(
                        "storage buffer `{var_name}` must be a runtime-sized array of f32, u32 or i32 (or their atomics)"
                    ))
                })?;
                let role = if access.contains(StorageAccess::STORE) {
                    BufferRole::InOut
                } else {
                    BufferRole::Input
                };
                buffers.push(BufferBinding {
                    name: var_name,
                    binding: binding.binding,
                    elem,
                    role,
                    len_rule: None,
                });
            }
            AddressSpace::Uniform => {
                if params.is_some() {
                    return Err(unsupported(
                        "more than one uniform block; scalar arguments go in one struct".into(),
                    ));
                }
                let TypeInner::Struct { members, span } = &ty.inner else {
                    return Err(unsupported(format!(
                        "uniform `{var_name}` must be a struct of f32, u32 and i32 members"
                    )));
                };
                let mut out = Vec::new();
                for m in members {
                    let member_name = m.name.clone().unwrap_or_default();
                    let elem = match &module.types[m.ty].inner {
                        TypeInner::Scalar(s) => scalar_elem(*s),
                        _ => None,
                    }
                    .ok_or_else(|| {
                        unsupported(format!(
                            "uniform member `{member_name}` must be f32, u32 or i32"
                        ))
                    })?;
                    out.push(ParamMember {
                        name: member_name,
                        elem,
                        offset: m.offset,
                    });
                }
                params = Some(ParamsBlock {
                    name: var_name,
                    binding: binding.binding,
                    size: *span,
                    members: out,
                });
            }
            _ => {
                return Err(unsupported(format!(
                    "`{var_name}` is not a storage buffer or uniform block; textures and samplers are not supported"
                )));
            }
        }
    }
    buffers.sort_by_key(|b| b.binding);

    let mut interface = KernelInterface {
        name: name.to_owned(),
        buffers,
        params,
        stages: Vec::new(),
        requires: Vec::new(),
        derived_order: Vec::new(),
        flexible_workgroups: false,
    };
    apply_directives(&mut interface, module, source)?;
    check_names(&interface)?;
    Ok(interface)
}

fn scalar_elem(s: naga::Scalar) -> Option<ElemType> {
    match (s.kind, s.width) {
        (ScalarKind::Float, 4) => Some(ElemType::F32),
        (ScalarKind::Uint, 4) => Some(ElemType::U32),
        (ScalarKind::Sint, 4) => Some(ElemType::I32),
        _ => None,
    }
}

fn elem_of(inner: &TypeInner) -> Option<ElemType> {
    match inner {
        TypeInner::Scalar(s) | TypeInner::Atomic(s) => scalar_elem(*s),
        _ => None,
    }
}

fn apply_directives(
    k: &mut KernelInterface,
    module: &naga::Module,
    source: &str,
) -> Result<(), KernelError> {
    for (i, line) in source.lines().enumerate() {
        let Some(rest) = line.trim_start().strip_prefix(DIRECTIVE) else {
            continue;
        };
        let err = |detail: String| KernelError::Directive {
            kernel: k.name.clone(),
            line: i + 1,
            detail,
        };
        let rule = |text: &str| {
            Rule::parse(text).map_err(|source| KernelError::Rule {
                kernel: k.name.clone(),
                source,
            })
        };
        let rest = rest.trim();
        let (verb, body) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
        match verb {
            "output" | "scratch" => {
                let (buf, expr) = body
                    .split_once('=')
                    .ok_or_else(|| err(format!("expected `{verb} <buffer> = <length>`")))?;
                let buf = buf.trim();
                let parsed = rule(expr)?;
                let idx = k
                    .buffers
                    .iter()
                    .position(|b| b.name == buf)
                    .ok_or_else(|| err(format!("no storage buffer named `{buf}`")))?;
                let b = &mut k.buffers[idx];
                if b.role != BufferRole::InOut {
                    return Err(err(format!(
                        "`{buf}` must be a read_write storage buffer declared once"
                    )));
                }
                b.role = if verb == "output" {
                    BufferRole::Output
                } else {
                    BufferRole::Scratch
                };
                b.len_rule = Some(parsed);
                k.derived_order.push(idx);
            }
            "stage" => {
                let (entry, expr) = body
                    .split_once('=')
                    .ok_or_else(|| err("expected `stage <entry_point> = <workgroups>`".into()))?;
                let entry = entry.trim();
                let ep = module
                    .entry_points
                    .iter()
                    .find(|e| e.name == entry)
                    .ok_or_else(|| err(format!("no entry point named `{entry}`")))?;
                if ep.stage != ShaderStage::Compute {
                    return Err(err(format!("entry point `{entry}` is not @compute")));
                }
                k.stages.push(Stage {
                    entry_point: entry.to_owned(),
                    workgroup_size: ep.workgroup_size,
                    workgroups: rule(expr)?,
                });
            }
            "flexible_workgroups" => {
                if !body.trim().is_empty() {
                    return Err(err("`flexible_workgroups` takes nothing after it".into()));
                }
                k.flexible_workgroups = true;
            }
            "require" => {
                let (expr, message) = body.split_once(" else ").ok_or_else(|| {
                    err("expected `require <condition> else \"<message>\"`".into())
                })?;
                let message = message.trim().trim_matches('"').to_owned();
                k.requires.push(Require {
                    rule: rule(expr)?,
                    message,
                });
            }
            other => return Err(err(format!("unknown directive `{other}`"))),
        }
    }
    if k.stages.is_empty() {
        return Err(KernelError::Unsupported {
            kernel: k.name.clone(),
            detail: "no `// quasar: stage <entry_point> = <workgroups>` directive".into(),
        });
    }
    if k.flexible_workgroups && k.stages.len() != 1 {
        return Err(KernelError::Unsupported {
            kernel: k.name.clone(),
            detail: "`flexible_workgroups` needs exactly one stage".into(),
        });
    }
    Ok(())
}

/// Rejects name clashes that would make `len_<buffer>` or argument names
/// ambiguous in rules.
fn check_names(k: &KernelInterface) -> Result<(), KernelError> {
    let mut names: Vec<String> = k
        .buffers
        .iter()
        .map(|b| format!("len_{}", b.name))
        .collect();
    names.extend(
        k.params
            .iter()
            .flat_map(|p| p.members.iter().map(|m| m.name.clone())),
    );
    names.extend(["max_wg", "wg_x", "wg_y", "wg_z"].map(String::from));
    let mut sorted = names.clone();
    sorted.sort();
    for w in sorted.windows(2) {
        if w[0] == w[1] {
            return Err(KernelError::Unsupported {
                kernel: k.name.clone(),
                detail: format!("the name `{}` is used twice in the kernel's rules", w[0]),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_kernels_reflect() {
        for s in quasar_shaders::SHIPPED {
            let k = KernelInterface::from_wgsl(s.name, s.source)
                .unwrap_or_else(|e| panic!("{e}"))
                .interface;
            assert!(!k.stages.is_empty());
            assert!(k.buffers.iter().any(|b| b.role.is_returned()), "{}", k.name);
        }
        let saxpy = KernelInterface::from_wgsl("saxpy", quasar_shaders::SHIPPED[0].source)
            .expect("saxpy")
            .interface;
        assert_eq!(saxpy.buffer("x").map(|b| b.role), Some(BufferRole::Input));
        assert_eq!(saxpy.buffer("y").map(|b| b.role), Some(BufferRole::InOut));
        let p = saxpy.params.expect("params");
        assert_eq!(p.members[0].name, "a");
        assert_eq!(p.members[0].elem, ElemType::F32);
        assert_eq!(saxpy.stages[0].workgroup_size, [256, 1, 1]);
    }

    #[test]
    fn bad_kernels_are_refused_with_a_reason() {
        let cases = [
            ("fn main( {", "parse"),
            (
                "@group(0) @binding(0) var<storage, read_write> x: array<f32>;\n@compute @workgroup_size(1) fn main() { x[0] = 1.0; }",
                "no `// quasar: stage",
            ),
            (
                "// quasar: stage nope = 1\n@group(0) @binding(0) var<storage, read_write> x: array<f32>;\n@compute @workgroup_size(1) fn main() { x[0] = 1.0; }",
                "no entry point named `nope`",
            ),
            (
                "// quasar: output y = 1\n// quasar: stage main = 1\n@group(0) @binding(0) var<storage, read_write> x: array<f32>;\n@compute @workgroup_size(1) fn main() { x[0] = 1.0; }",
                "no storage buffer named `y`",
            ),
            (
                "// quasar: stage main = 1\n@group(1) @binding(0) var<storage, read_write> x: array<f32>;\n@compute @workgroup_size(1) fn main() { x[0] = 1.0; }",
                "bind group 1",
            ),
            (
                "// quasar: stage main = 1\n@group(0) @binding(0) var<storage, read_write> x: array<f64>;\n@compute @workgroup_size(1) fn main() { }",
                "",
            ),
            (
                "// quasar: frobnicate\n// quasar: stage main = 1\n@group(0) @binding(0) var<storage, read_write> x: array<f32>;\n@compute @workgroup_size(1) fn main() { x[0] = 1.0; }",
                "unknown directive",
            ),
        ];
        for (src, want) in cases {
            let err = KernelInterface::from_wgsl("bad", src)
                .expect_err(src)
                .to_string();
            assert!(err.contains(want), "{err:?} does not contain {want:?}");
        }
    }
}
