//! Fused dispatch: one dispatch runs many calls of one kernel.
//!
//! Calls that arrive together already share a submission; each was still
//! its own dispatch, and a dispatch has a fixed cost of its own. On lavapipe
//! that cost dominates small calls: every dispatch is handed to Mesa's
//! thread pool and waited for (BENCHMARKS.md, "lavapipe's compute
//! threads"). [`fuse`] rewrites a kernel so that one dispatch of
//! `(x, 1, calls)` workgroups runs `calls` calls: the calls' buffers are laid
//! end to end in one buffer per binding, and workgroup `z` runs call `z`.
//!
//! The rewrite (on naga's IR, of the kernel's entry point):
//! - each call's part of a buffer is its `len` elements and one more, a
//!   zeroed "sink" that is never returned; every access `buf[i]` becomes
//!   `buf[off + min(u32(i), len)]`, with the call's offset and length read
//!   from a table of the calls, so a call reaches nothing outside its own
//!   part, whatever the kernel indexes. An access past the end lands on
//!   the sink: a read sees zero (unless the call wrote past its end
//!   before), a write reaches nothing returned, much as on a device with
//!   robust buffer access;
//! - `arrayLength(&buf)` becomes the call's length;
//! - the uniform block of arguments becomes a read-only storage array with
//!   one block per call;
//! - `workgroup_id`, `num_workgroups` and `global_invocation_id` read as
//!   they would in the call's own `(x, 1, 1)` dispatch, and the body runs
//!   only in the call's own `x` workgroups (the dispatch has the most any
//!   call asked for), so a fused call computes exactly what it would alone
//!   as long as it stays in bounds. An access out of bounds reaches the
//!   call's sink element, zeroed for each call, where a lone dispatch gets
//!   what wgpu's bounds checks give on that backend (a clamped index or
//!   zero).
//!
//! Only kernels declared `flexible_workgroups` are fused: one 1-D stage,
//! whose calls can share a dispatch whatever their workgroup counts. A
//! kernel whose entry point
//! uses its buffers in any other way (passing a pointer to one to a
//! function, a helper function reading one, textures...) is not fused and
//! runs one dispatch per call as before; [`fuse`] says why.

use std::collections::HashMap;

use naga::{
    AddressSpace, ArraySize, BinaryOperator, Binding, BuiltIn, Expression, Handle, Literal,
    MathFunction, ResourceBinding, Scalar, ScalarKind, Span, Statement, StorageAccess, Type,
    TypeInner, VectorSize,
};
use thiserror::Error;

use super::KernelInterface;
use super::plan::DeviceCaps;

/// A kernel rewritten to run many calls in one dispatch.
#[derive(Debug)]
pub struct FusedKernel {
    /// The rewritten module, with only the kernel's entry point.
    pub module: naga::Module,
    /// The binding of the table of calls: a read-only storage `array<u32>`
    /// holding, for each call in turn, its workgroup count and then the
    /// element offset and the length of each storage buffer, in the
    /// interface's order (see [`table_row`]).
    pub table_binding: u32,
    /// Bytes of each call's arguments, one after another in the argument
    /// array (bound at the uniform block's binding, as read-only storage).
    pub params_stride: Option<u32>,
}

/// Appends a call's row of the table of calls: its workgroup count along
/// x, then each buffer's element offset and length. Offsets and lengths
/// are those [`group_calls`] let through, which fit a `u32`; should one
/// not, the row is refused (`None`, the table left as it was), never
/// saturated: a saturated offset would make the shader's clamped index
/// wrap into another call's part.
pub fn table_row(
    table: &mut Vec<u8>,
    x: u32,
    parts: impl IntoIterator<Item = (u64, u64)>,
) -> Option<()> {
    let start = table.len();
    table.extend(x.to_le_bytes());
    for (offset, len) in parts {
        let (Ok(offset), Ok(len)) = (u32::try_from(offset), u32::try_from(len)) else {
            table.truncate(start);
            return None;
        };
        table.extend(offset.to_le_bytes());
        table.extend(len.to_le_bytes());
    }
    Some(())
}

/// Why a kernel is not fused: it is still served, one dispatch per call.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{0}")]
pub struct NotFusable(String);

fn no(why: impl Into<String>) -> NotFusable {
    NotFusable(why.into())
}

/// Where each old expression went in the rebuilt arena.
struct Moved {
    /// The new handle standing for the old expression.
    to: Vec<Handle<Expression>>,
    /// The new arena's span of indices holding what the old expression
    /// became (empty when it became a prelude expression).
    span: Vec<std::ops::Range<u32>>,
    /// Old expressions that are a storage buffer's variable, and which.
    buffer: HashMap<Handle<Expression>, usize>,
}

impl Moved {
    fn get(&self, old: Handle<Expression>) -> Result<Handle<Expression>, NotFusable> {
        if self.buffer.contains_key(&old) {
            return Err(no(
                "its entry point uses a storage buffer other than by indexing it or taking its arrayLength",
            ));
        }
        self.to
            .get(old.index())
            .copied()
            .ok_or_else(|| no("an expression refers to a later one"))
    }

    /// The new handle of `old`, whatever it is (for names).
    fn raw(&self, old: Handle<Expression>) -> Option<Handle<Expression>> {
        self.to.get(old.index()).copied()
    }

    fn opt(
        &self,
        old: Option<Handle<Expression>>,
    ) -> Result<Option<Handle<Expression>>, NotFusable> {
        old.map(|h| self.get(h)).transpose()
    }
}

/// Rewrites `module` (the kernel `iface` was reflected from) to run many
/// calls in one dispatch. The result is validated with naga.
///
/// # Errors
/// [`NotFusable`] saying why the kernel runs one dispatch per call.
pub fn fuse(iface: &KernelInterface, module: &naga::Module) -> Result<FusedKernel, NotFusable> {
    if !iface.flexible_workgroups {
        return Err(no("it is not declared `flexible_workgroups`"));
    }
    let [stage] = &iface.stages[..] else {
        return Err(no("it has more than one stage"));
    };
    let mut m = module.clone();
    let at = m
        .entry_points
        .iter()
        .position(|e| e.name == stage.entry_point)
        .ok_or_else(|| no("its stage names no entry point"))?;
    let mut ep = m.entry_points.swap_remove(at);
    // The other entry points use the same variables, whose meaning changes.
    m.entry_points.clear();
    if ep.workgroup_size_overrides.is_some() {
        return Err(no("its workgroup size is set by pipeline overrides"));
    }

    let mut buffer_var = HashMap::new();
    let mut params_var = None;
    let mut last_binding = 0;
    for (h, var) in m.global_variables.iter() {
        let Some(b) = &var.binding else { continue };
        last_binding = last_binding.max(b.binding);
        match var.space {
            AddressSpace::Storage { .. } => {
                let i = iface
                    .buffers
                    .iter()
                    .position(|x| x.binding == b.binding)
                    .ok_or_else(|| no("a storage buffer is missing from the interface"))?;
                buffer_var.insert(h, i);
            }
            AddressSpace::Uniform => params_var = Some(h),
            _ => return Err(no("it binds something other than buffers")),
        }
    }
    for (_, f) in m.functions.iter() {
        for (_, e) in f.expressions.iter() {
            if let Expression::GlobalVariable(g) = e
                && (buffer_var.contains_key(g) || Some(*g) == params_var)
            {
                return Err(no(format!(
                    "function `{}` uses a buffer or the arguments; only the entry point may",
                    f.name.as_deref().unwrap_or("?")
                )));
            }
        }
    }

    let sp = Span::UNDEFINED;
    let u32_ty = m.types.insert(
        Type {
            name: None,
            inner: TypeInner::Scalar(Scalar::U32),
        },
        sp,
    );
    let vec3u = m.types.insert(
        Type {
            name: None,
            inner: TypeInner::Vector {
                size: VectorSize::Tri,
                scalar: Scalar::U32,
            },
        },
        sp,
    );
    let table_ty = m.types.insert(
        Type {
            name: None,
            inner: TypeInner::Array {
                base: u32_ty,
                size: ArraySize::Dynamic,
                stride: 4,
            },
        },
        sp,
    );
    let table_binding = last_binding
        .checked_add(1)
        .ok_or_else(|| no("no binding number is left for the table of calls"))?;
    let read_only = AddressSpace::Storage {
        access: StorageAccess::LOAD,
    };
    let table_var = m.global_variables.append(
        naga::GlobalVariable {
            name: Some("quasar_calls".into()),
            space: read_only,
            binding: Some(ResourceBinding {
                group: 0,
                binding: table_binding,
            }),
            ty: table_ty,
            init: None,
            memory_decorations: Default::default(),
        },
        sp,
    );
    let mut params_stride = None;
    if let Some(pv) = params_var {
        let block_ty = m.global_variables[pv].ty;
        let TypeInner::Struct { span, .. } = m.types[block_ty].inner else {
            return Err(no("its arguments are not a struct"));
        };
        // WGSL rounds a struct's size up to its alignment, so its size is
        // a valid array stride.
        let array = m.types.insert(
            Type {
                name: None,
                inner: TypeInner::Array {
                    base: block_ty,
                    size: ArraySize::Dynamic,
                    stride: span,
                },
            },
            sp,
        );
        let var = m.global_variables.get_mut(pv);
        var.space = read_only;
        var.ty = array;
        params_stride = Some(span);
    }

    let f = &mut ep.function;
    let (mut wid_arg, mut gid_arg, mut nwg_arg) = (None, None, None);
    for (i, a) in f.arguments.iter().enumerate() {
        let i = i as u32;
        match a.binding {
            Some(Binding::BuiltIn(BuiltIn::WorkGroupId)) => wid_arg = Some(i),
            Some(Binding::BuiltIn(BuiltIn::GlobalInvocationId)) => gid_arg = Some(i),
            Some(Binding::BuiltIn(BuiltIn::NumWorkGroups)) => nwg_arg = Some(i),
            // The same in a call's own dispatch and in the fused one.
            Some(Binding::BuiltIn(
                BuiltIn::LocalInvocationId
                | BuiltIn::LocalInvocationIndex
                | BuiltIn::WorkGroupSize
                | BuiltIn::SubgroupSize
                | BuiltIn::SubgroupInvocationId
                | BuiltIn::SubgroupId
                | BuiltIn::NumSubgroups,
            )) => {}
            _ => {
                return Err(no(format!(
                    "its entry point takes `{}`, which fused dispatches do not support",
                    a.name.as_deref().unwrap_or("?")
                )));
            }
        }
    }
    let had_wid = wid_arg.is_some();
    let wid_arg = match wid_arg {
        Some(i) => i,
        None => {
            f.arguments.push(naga::FunctionArgument {
                name: Some("quasar_workgroup_id".into()),
                ty: vec3u,
                binding: Some(Binding::BuiltIn(BuiltIn::WorkGroupId)),
            });
            (f.arguments.len() - 1) as u32
        }
    };

    let old = std::mem::take(&mut f.expressions);
    let mut new = naga::Arena::new();
    let lit = |v: u32| Expression::Literal(Literal::U32(v));
    let nb = iface.buffers.len() as u32;

    // The prelude: first what needs no emitting, then what the body's first
    // statement emits. Everything after may use it.
    let e_wid = new.append(Expression::FunctionArgument(wid_arg), sp);
    let e_gid = gid_arg.map(|i| new.append(Expression::FunctionArgument(i), sp));
    let e_nwg = nwg_arg.map(|i| new.append(Expression::FunctionArgument(i), sp));
    let e_table = new.append(Expression::GlobalVariable(table_var), sp);
    let e_params = params_var.map(|g| new.append(Expression::GlobalVariable(g), sp));
    let l_zero = new.append(lit(0), sp);
    let l_one = new.append(lit(1), sp);
    let l_words = new.append(lit(1 + 2 * nb), sp);
    let l_wg_z = new.append(lit(ep.workgroup_size[2]), sp);
    let l_slot: Vec<_> = (0..1 + 2 * nb).map(|k| new.append(lit(k), sp)).collect();
    let mut l_const = HashMap::new();
    for (_, e) in old.iter() {
        if let Expression::AccessIndex { base, index } = *e
            && matches!(old[base], Expression::GlobalVariable(g) if buffer_var.contains_key(&g))
        {
            l_const
                .entry(index)
                .or_insert_with(|| new.append(lit(index), sp));
        }
    }
    let first_emitted = new.len() as u32;
    let call = new.append(
        Expression::AccessIndex {
            base: e_wid,
            index: 2,
        },
        sp,
    );
    let row = new.append(
        Expression::Binary {
            op: BinaryOperator::Multiply,
            left: call,
            right: l_words,
        },
        sp,
    );
    let table_word = |new: &mut naga::Arena<Expression>, slot: Handle<Expression>| {
        let index = new.append(
            Expression::Binary {
                op: BinaryOperator::Add,
                left: row,
                right: slot,
            },
            sp,
        );
        let pointer = new.append(
            Expression::Access {
                base: e_table,
                index,
            },
            sp,
        );
        new.append(Expression::Load { pointer }, sp)
    };
    let own_x = table_word(&mut new, l_slot[0]);
    let mut offset = Vec::new();
    let mut len = Vec::new();
    for b in 0..nb as usize {
        offset.push(table_word(&mut new, l_slot[1 + 2 * b]));
        len.push(table_word(&mut new, l_slot[2 + 2 * b]));
    }
    let p_params = e_params.map(|base| new.append(Expression::Access { base, index: call }, sp));
    let wid_x = new.append(
        Expression::AccessIndex {
            base: e_wid,
            index: 0,
        },
        sp,
    );
    let in_own_dispatch = new.append(
        Expression::Binary {
            op: BinaryOperator::Less,
            left: wid_x,
            right: own_x,
        },
        sp,
    );
    let vec3 = |new: &mut naga::Arena<Expression>, v: Handle<Expression>, x, z| {
        let x = match x {
            Some(x) => x,
            None => new.append(Expression::AccessIndex { base: v, index: 0 }, sp),
        };
        let y = new.append(Expression::AccessIndex { base: v, index: 1 }, sp);
        new.append(
            Expression::Compose {
                ty: vec3u,
                components: vec![x, y, z],
            },
            sp,
        )
    };
    let wid_now = had_wid.then(|| vec3(&mut new, e_wid, None, l_zero));
    let nwg_now = e_nwg.map(|v| vec3(&mut new, v, Some(own_x), l_one));
    let gid_now = match e_gid {
        Some(g) => {
            let z = new.append(Expression::AccessIndex { base: g, index: 2 }, sp);
            let calls_before = new.append(
                Expression::Binary {
                    op: BinaryOperator::Multiply,
                    left: call,
                    right: l_wg_z,
                },
                sp,
            );
            let z = new.append(
                Expression::Binary {
                    op: BinaryOperator::Subtract,
                    left: z,
                    right: calls_before,
                },
                sp,
            );
            Some(vec3(&mut new, g, None, z))
        }
        None => None,
    };
    let prelude = naga::Range::from_index_range(first_emitted..new.len() as u32, &new);

    let mut moved = Moved {
        to: Vec::with_capacity(old.len()),
        span: Vec::with_capacity(old.len()),
        buffer: HashMap::new(),
    };
    for (h, e) in old.iter() {
        let start = new.len() as u32;
        let span = old.get_span(h);
        let to = match *e {
            Expression::GlobalVariable(g) if Some(g) == params_var => {
                p_params.ok_or_else(|| no("arguments without a block"))?
            }
            Expression::GlobalVariable(g) => {
                if let Some(&b) = buffer_var.get(&g) {
                    moved.buffer.insert(h, b);
                }
                new.append(e.clone(), span)
            }
            Expression::FunctionArgument(i) if Some(i) == gid_arg => {
                gid_now.ok_or_else(|| no("global_invocation_id"))?
            }
            Expression::FunctionArgument(i) if Some(i) == nwg_arg => {
                nwg_now.ok_or_else(|| no("num_workgroups"))?
            }
            Expression::FunctionArgument(i) if i == wid_arg => {
                wid_now.ok_or_else(|| no("workgroup_id"))?
            }
            Expression::ArrayLength(p) if moved.buffer.contains_key(&p) => len[moved.buffer[&p]],
            Expression::Access { base, index } if moved.buffer.contains_key(&base) => {
                let b = moved.buffer[&base];
                let index = moved.get(index)?;
                let index = new.append(
                    Expression::As {
                        expr: index,
                        kind: ScalarKind::Uint,
                        convert: Some(4),
                    },
                    span,
                );
                clamped_access(&mut new, &moved, base, index, offset[b], len[b], span)?
            }
            Expression::AccessIndex { base, index } if moved.buffer.contains_key(&base) => {
                let b = moved.buffer[&base];
                let index = *l_const
                    .get(&index)
                    .ok_or_else(|| no("a constant index was not collected"))?;
                clamped_access(&mut new, &moved, base, index, offset[b], len[b], span)?
            }
            _ => new.append(remap_expression(e, &moved)?, span),
        };
        moved.to.push(to);
        moved.span.push(start..new.len() as u32);
    }

    for (_, local) in f.local_variables.iter_mut() {
        local.init = moved.opt(local.init)?;
    }
    let mut named = naga::FastIndexMap::default();
    for (h, name) in f.named_expressions.drain(..) {
        // `let p = &buf;` names the buffer's variable itself.
        if let Some(h) = moved.raw(h) {
            named.entry(h).or_insert(name);
        }
    }
    f.named_expressions = named;
    remap_block(&mut f.body, &moved, &new)?;
    // Workgroups past the call's own count do nothing. The condition is
    // uniform (the workgroup id and a read-only table), so barriers in the
    // body stay valid.
    let body = std::mem::take(&mut f.body);
    f.body = naga::Block::from_vec(vec![
        Statement::Emit(prelude),
        Statement::If {
            condition: in_own_dispatch,
            accept: body,
            reject: naga::Block::new(),
        },
    ]);
    f.expressions = new;
    m.entry_points.push(ep);

    super::validator().validate(&m).map_err(|e| {
        no(format!(
            "the fused kernel does not validate: {}",
            e.as_inner()
        ))
    })?;
    Ok(FusedKernel {
        module: m,
        table_binding,
        params_stride,
    })
}

/// What grouping needs of one call of a batch that could run fused.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    /// Calls fuse only with calls of the same key: the kernel set's
    /// version, the kernel, and the client.
    pub key: (u64, usize, u64),
    /// The call's buffer lengths in elements, in the interface's order.
    pub lens: &'a [u64],
    /// Bytes of its argument block (0 without one).
    pub params_bytes: u64,
}

/// Which calls of a batch share a dispatch: calls of one key, in batch
/// order, in groups whose buffers (each call's part with its sink) fit one
/// binding of the device each (and
/// whose offsets and lengths fit the table's `u32`s) and whose count fits
/// the device's workgroup dimension. `None` is a call that runs alone.
/// Only groups of two calls or more are returned, as indices into `calls`.
///
/// Calls of different clients never share a dispatch: the rewrite keeps
/// each call to its own part of the buffers, and keeping clients apart as
/// well means no fault in it (or in a kernel) could show one client
/// another's data.
pub fn group_calls<'a>(
    calls: impl IntoIterator<Item = Option<Candidate<'a>>>,
    caps: &DeviceCaps,
) -> Vec<Vec<usize>> {
    struct Open {
        calls: Vec<usize>,
        elems: Vec<u64>,
        params: u64,
    }
    let room = (caps.max_storage_binding.min(caps.max_buffer_size) / 4).min(u64::from(u32::MAX));
    let most_calls = caps.max_workgroups_per_dim as usize;
    let mut groups: Vec<Open> = Vec::new();
    let mut open: HashMap<(u64, usize, u64), usize> = HashMap::new();
    for (i, call) in calls.into_iter().enumerate() {
        let Some(c) = call else { continue };
        let fits = |g: &Open| {
            g.calls.len() < most_calls
                && g.elems.len() == c.lens.len()
                // The call's part and its sink element.
                && g.elems.iter().zip(c.lens).all(|(e, l)| e + l < room)
                && g.params + c.params_bytes <= caps.max_storage_binding
        };
        let g = match open.get(&c.key) {
            Some(&g) if fits(&groups[g]) => g,
            _ => {
                groups.push(Open {
                    calls: Vec::new(),
                    elems: vec![0; c.lens.len()],
                    params: 0,
                });
                open.insert(c.key, groups.len() - 1);
                groups.len() - 1
            }
        };
        let g = &mut groups[g];
        g.calls.push(i);
        for (e, l) in g.elems.iter_mut().zip(c.lens) {
            *e += l + 1;
        }
        g.params += c.params_bytes;
    }
    groups
        .into_iter()
        .map(|g| g.calls)
        .filter(|c| c.len() > 1)
        .collect()
}

/// `base[offset + min(index, len)]`: an element of the call's own part of
/// the buffer (`len` is its sink), whatever `index` is.
fn clamped_access(
    new: &mut naga::Arena<Expression>,
    moved: &Moved,
    old_base: Handle<Expression>,
    index: Handle<Expression>,
    offset: Handle<Expression>,
    len: Handle<Expression>,
    span: Span,
) -> Result<Handle<Expression>, NotFusable> {
    let base = moved
        .raw(old_base)
        .ok_or_else(|| no("a buffer is used before it is named"))?;
    let within = new.append(
        Expression::Math {
            fun: MathFunction::Min,
            arg: index,
            arg1: Some(len),
            arg2: None,
            arg3: None,
        },
        span,
    );
    let index = new.append(
        Expression::Binary {
            op: BinaryOperator::Add,
            left: offset,
            right: within,
        },
        span,
    );
    Ok(new.append(Expression::Access { base, index }, span))
}

/// `e` with its operands moved to the new arena; kinds of expression a
/// compute kernel over buffers has no use for are refused.
fn remap_expression(e: &Expression, m: &Moved) -> Result<Expression, NotFusable> {
    use Expression as E;
    let mut e = e.clone();
    match &mut e {
        E::Literal(_)
        | E::Constant(_)
        | E::Override(_)
        | E::ZeroValue(_)
        | E::FunctionArgument(_)
        | E::GlobalVariable(_)
        | E::LocalVariable(_)
        | E::CallResult(_)
        | E::AtomicResult { .. }
        | E::WorkGroupUniformLoadResult { .. }
        | E::SubgroupBallotResult
        | E::SubgroupOperationResult { .. } => {}
        E::Compose { components, .. } => {
            for c in components {
                *c = m.get(*c)?;
            }
        }
        E::AccessIndex { base: h, .. }
        | E::Splat { value: h, .. }
        | E::Swizzle { vector: h, .. }
        | E::Load { pointer: h }
        | E::Unary { expr: h, .. }
        | E::Derivative { expr: h, .. }
        | E::Relational { argument: h, .. }
        | E::As { expr: h, .. }
        | E::ArrayLength(h) => *h = m.get(*h)?,
        E::Access { base, index } => {
            *base = m.get(*base)?;
            *index = m.get(*index)?;
        }
        E::Binary { left, right, .. } => {
            *left = m.get(*left)?;
            *right = m.get(*right)?;
        }
        E::Select {
            condition,
            accept,
            reject,
        } => {
            for h in [condition, accept, reject] {
                *h = m.get(*h)?;
            }
        }
        E::Math {
            arg,
            arg1,
            arg2,
            arg3,
            ..
        } => {
            *arg = m.get(*arg)?;
            for a in [arg1, arg2, arg3] {
                *a = m.opt(*a)?;
            }
        }
        E::ImageSample { .. }
        | E::ImageLoad { .. }
        | E::ImageQuery { .. }
        | E::RayQueryVertexPositions { .. }
        | E::RayQueryProceedResult
        | E::RayQueryGetIntersection { .. }
        | E::CooperativeLoad { .. }
        | E::CooperativeMultiplyAdd { .. } => {
            return Err(no(
                "its entry point uses images, ray queries or cooperative matrices",
            ));
        }
    }
    Ok(e)
}

fn remap_block(
    block: &mut naga::Block,
    m: &Moved,
    new: &naga::Arena<Expression>,
) -> Result<(), NotFusable> {
    for s in block.iter_mut() {
        remap_statement(s, m, new)?;
    }
    Ok(())
}

fn remap_statement(
    s: &mut Statement,
    m: &Moved,
    new: &naga::Arena<Expression>,
) -> Result<(), NotFusable> {
    use Statement as S;
    let get = |h: &mut Handle<Expression>| -> Result<(), NotFusable> {
        *h = m.get(*h)?;
        Ok(())
    };
    let opt = |h: &mut Option<Handle<Expression>>| -> Result<(), NotFusable> {
        *h = m.opt(*h)?;
        Ok(())
    };
    match s {
        S::Emit(range) => {
            let old = range.index_range();
            let (start, end) = if old.is_empty() {
                let at = m
                    .span
                    .get(old.start as usize)
                    .map_or(new.len() as u32, |s| s.start);
                (at, at)
            } else {
                let first = m.span.get(old.start as usize);
                let last = m.span.get(old.end as usize - 1);
                match (first, last) {
                    (Some(f), Some(l)) => (f.start, l.end),
                    _ => return Err(no("an emitted range lies outside the function")),
                }
            };
            *range = naga::Range::from_index_range(start..end, new);
        }
        S::Block(b) => remap_block(b, m, new)?,
        S::If {
            condition,
            accept,
            reject,
        } => {
            get(condition)?;
            remap_block(accept, m, new)?;
            remap_block(reject, m, new)?;
        }
        S::Switch { selector, cases } => {
            get(selector)?;
            for case in cases {
                remap_block(&mut case.body, m, new)?;
            }
        }
        S::Loop {
            body,
            continuing,
            break_if,
        } => {
            remap_block(body, m, new)?;
            remap_block(continuing, m, new)?;
            opt(break_if)?;
        }
        S::Break | S::Continue | S::Kill | S::ControlBarrier(_) | S::MemoryBarrier(_) => {}
        S::Return { value } => opt(value)?,
        S::Store { pointer, value } => {
            get(pointer)?;
            get(value)?;
        }
        S::Atomic {
            pointer,
            fun,
            value,
            result,
        } => {
            get(pointer)?;
            get(value)?;
            opt(result)?;
            if let naga::AtomicFunction::Exchange {
                compare: Some(c), ..
            } = fun
            {
                get(c)?;
            }
        }
        S::WorkGroupUniformLoad { pointer, result } => {
            get(pointer)?;
            get(result)?;
        }
        S::Call {
            arguments, result, ..
        } => {
            for a in arguments {
                get(a)?;
            }
            opt(result)?;
        }
        S::SubgroupBallot { result, predicate } => {
            get(result)?;
            opt(predicate)?;
        }
        S::SubgroupGather {
            mode,
            argument,
            result,
        } => {
            get(argument)?;
            get(result)?;
            match mode {
                naga::GatherMode::BroadcastFirst | naga::GatherMode::QuadSwap(_) => {}
                naga::GatherMode::Broadcast(h)
                | naga::GatherMode::Shuffle(h)
                | naga::GatherMode::ShuffleDown(h)
                | naga::GatherMode::ShuffleUp(h)
                | naga::GatherMode::ShuffleXor(h)
                | naga::GatherMode::QuadBroadcast(h) => get(h)?,
            }
        }
        S::SubgroupCollectiveOperation {
            argument, result, ..
        } => {
            get(argument)?;
            get(result)?;
        }
        S::ImageStore { .. }
        | S::ImageAtomic { .. }
        | S::RayQuery { .. }
        | S::RayPipelineFunction(_)
        | S::CooperativeStore { .. } => {
            return Err(no(
                "its entry point uses images, ray queries or cooperative matrices",
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fused(name: &str, source: &str) -> Result<FusedKernel, NotFusable> {
        let parsed = KernelInterface::from_wgsl(name, source).unwrap_or_else(|e| panic!("{e}"));
        fuse(&parsed.interface, &parsed.module)
    }

    #[test]
    fn the_flexible_shipped_kernels_fuse_and_the_others_do_not() {
        for k in quasar_shaders::SHIPPED {
            let iface = KernelInterface::from_wgsl(k.name, k.source)
                .unwrap_or_else(|e| panic!("{e}"))
                .interface;
            let got = fused(k.name, k.source);
            if iface.flexible_workgroups {
                let f = got.unwrap_or_else(|e| panic!("{}: {e}", k.name));
                assert_eq!(f.module.entry_points.len(), 1);
                let last = iface
                    .buffers
                    .iter()
                    .map(|b| b.binding)
                    .chain(iface.params.iter().map(|p| p.binding))
                    .max();
                assert_eq!(Some(f.table_binding), last.map(|b| b + 1));
                assert_eq!(f.params_stride, iface.params.map(|p| p.size));
            } else {
                assert!(got.is_err(), "{} fused", k.name);
            }
        }
    }

    const HEAD: &str = "// quasar: flexible_workgroups\n// quasar: stage main = 1\n@group(0) @binding(0) var<storage, read_write> y: array<f32>;\n";

    #[test]
    fn every_use_of_a_buffer_is_clamped_or_refused() {
        // Constant and signed indices, pointers, lengths, atomics-free
        // helper functions: all fuse.
        let ok = format!(
            "{HEAD}fn twice(v: f32) -> f32 {{ return 2.0 * v; }}\n@compute @workgroup_size(64, 1, 2) fn main(@builtin(global_invocation_id) g: vec3<u32>, @builtin(workgroup_id) w: vec3<u32>) {{ let p = &y; let i = i32(g.x) - 5; (*p)[i] = twice(y[0]) + f32(arrayLength(&y)) + f32(w.z + g.z); }}"
        );
        let f = fused("ok", &ok).unwrap_or_else(|e| panic!("{e}"));
        // No access of `y` is left unclamped: each index is an Add whose
        // right side is a Min.
        let fun = &f.module.entry_points[0].function;
        let mut accesses = 0;
        for (_, e) in fun.expressions.iter() {
            if let Expression::Access { base, index } = *e
                && matches!(fun.expressions[base], Expression::GlobalVariable(g)
                    if f.module.global_variables[g].name.as_deref() == Some("y"))
            {
                accesses += 1;
                let Expression::Binary {
                    op: BinaryOperator::Add,
                    right,
                    ..
                } = fun.expressions[index]
                else {
                    panic!("unclamped index {:?}", fun.expressions[index]);
                };
                assert!(matches!(
                    fun.expressions[right],
                    Expression::Math {
                        fun: MathFunction::Min,
                        ..
                    }
                ));
            }
        }
        assert_eq!(accesses, 2);

        // A barrier in a loop bounded by the call's length stays in
        // uniform control flow (the length comes from a read-only table).
        let barrier = format!(
            "{HEAD}var<workgroup> t: array<f32, 64>;\n@compute @workgroup_size(64) fn main(@builtin(local_invocation_index) l: u32) {{ for (var i = 0u; i < arrayLength(&y); i += 64u) {{ t[l] = y[min(i + l, arrayLength(&y) - 1u)]; workgroupBarrier(); y[i] = t[0]; workgroupBarrier(); }} }}"
        );
        let b = fused("barrier", &barrier).unwrap_or_else(|e| panic!("{e}"));
        let exprs = &b.module.entry_points[0].function.expressions;
        assert!(
            !exprs
                .iter()
                .any(|(_, e)| matches!(e, Expression::ArrayLength(_)))
        );
        assert!(
            !fun.expressions
                .iter()
                .any(|(_, e)| matches!(e, Expression::ArrayLength(_)))
        );

        let refused = [
            (
                format!(
                    "{HEAD}fn fetch(i: u32) -> f32 {{ return y[i]; }}\n@compute @workgroup_size(64) fn main() {{ y[0] = fetch(1u); }}"
                ),
                "function `fetch` uses a buffer",
            ),
            (
                format!(
                    "{HEAD}struct In {{ @builtin(global_invocation_id) g: vec3<u32> }}\n@compute @workgroup_size(64) fn main(i: In) {{ y[i.g.x] = 1.0; }}"
                ),
                "which fused dispatches do not support",
            ),
            (
                format!("{HEAD}@compute @workgroup_size(64) fn main() {{ y[0] = 1.0; }}")
                    .replace("// quasar: flexible_workgroups\n", ""),
                "not declared `flexible_workgroups`",
            ),
        ];
        for (src, want) in refused {
            let err = fused("bad", &src).expect_err(&src).to_string();
            assert!(err.contains(want), "{err:?} does not contain {want:?}");
        }
    }

    #[test]
    fn a_table_row_is_words_and_refuses_what_a_u32_cannot_hold() {
        let mut table = Vec::new();
        assert_eq!(table_row(&mut table, 7, [(0, 5), (6, 2)]), Some(()));
        let words: Vec<u32> = table
            .chunks_exact(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .collect();
        assert_eq!(words, [7, 0, 5, 6, 2]);
        // Saturating would let `off + min(i, len)` wrap into another part.
        assert_eq!(table_row(&mut table, 1, [(1 << 32, 1)]), None);
        assert_eq!(table_row(&mut table, 1, [(0, 1), (0, u64::MAX)]), None);
        assert_eq!(table.len(), 20, "a refused row leaves the table as it was");
    }

    #[test]
    fn calls_are_grouped_by_kernel_and_client_within_the_devices_limits() {
        let caps = DeviceCaps {
            max_workgroups_per_dim: 3,
            max_storage_binding: 400,
            max_buffer_size: 1 << 30,
        };
        let lens = [[20u64, 10], [20, 10], [20, 10], [20, 10], [30, 88]];
        let call = |key: u64, i: usize| {
            Some(Candidate {
                key: (0, 0, key),
                lens: &lens[i],
                params_bytes: 4,
            })
        };
        // Client 1's calls 0, 2 and 5 make a group (3 is the most a
        // dispatch's z may count), client 2's 1 and 6 another; call 3 runs
        // alone, and so does client 3's only call. Client 1's next two
        // calls fill the second buffer's 100 elements (400 bytes; each
        // call's part has one more element, its sink), so the call after
        // them starts another group.
        let calls = vec![
            call(1, 0),
            call(2, 0),
            call(1, 1),
            None,
            call(3, 0),
            call(1, 2),
            call(2, 1),
            call(1, 3),
            call(1, 4),
            call(1, 0),
            call(1, 1),
        ];
        assert_eq!(
            group_calls(calls, &caps),
            vec![vec![0, 2, 5], vec![1, 6], vec![7, 8], vec![9, 10]]
        );
        // A kernel reloaded meanwhile (another version) is another key.
        let other = Some(Candidate {
            key: (1, 0, 1),
            lens: &lens[0],
            params_bytes: 4,
        });
        assert_eq!(
            group_calls([call(1, 0), other], &caps),
            Vec::<Vec<usize>>::new()
        );
        // Argument blocks count against a binding too.
        let big = |key| {
            Some(Candidate {
                key: (0, 0, key),
                lens: &lens[0],
                params_bytes: 300,
            })
        };
        assert_eq!(
            group_calls([big(1), big(1)], &caps),
            Vec::<Vec<usize>>::new()
        );
    }
}
