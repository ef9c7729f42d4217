// saxpy: y = a * x + y, in place on y (single-precision "a times x plus y").
//
// quasar: require len_x == len_y else "x and y must have the same length"
// quasar: flexible_workgroups
// quasar: stage main = min(ceil_div(len_y, wg_x), max_wg)

struct Params {
    a: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;

// Grid-stride loop: correct for any dispatch size, so the dispatch can be
// capped at the device's per-dimension limit or overridden by the caller.
@compute @workgroup_size(256)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let n = arrayLength(&y);
    let stride = groups.x * 256u;
    for (var i = gid.x; i < n; i += stride) {
        y[i] = params.a * x[i] + y[i];
    }
}
