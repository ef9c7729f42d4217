// copy: out = input, element by element.
//
// The least work a kernel can do on its payload: a call of `copy` costs
// what the framework and the device path cost (upload, dispatch,
// readback) and next to nothing more, so it measures the payload path
// through the GPU, as `quasar.echo` measures it without one.
//
// Four elements per invocation: on lavapipe each workgroup has a fixed
// cost that a one-element copy does not cover (1 MiB: 489 us for the pass
// with one per invocation, 320 us with four, the same with 16 or 64;
// BENCHMARKS.md, "All eight targets on one build"), while a GPU still gets
// 256 workgroups per MiB.
//
// quasar: output out = len_input
// quasar: flexible_workgroups
// quasar: stage main = min(ceil_div(len_input, wg_x * 4), max_wg)

@group(0) @binding(0) var<storage, read> input: array<u32>;
@group(0) @binding(1) var<storage, read_write> out: array<u32>;

// Grid-stride loop, as in saxpy: correct for any dispatch size.
@compute @workgroup_size(256)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let n = arrayLength(&out);
    let stride = groups.x * 256u;
    for (var i = gid.x; i < n; i += stride) {
        out[i] = input[i];
    }
}
