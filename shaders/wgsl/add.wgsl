// add: out = a + b, element by element.
//
// quasar: require len_a == len_b else "a and b must have the same length"
// quasar: output out = len_a
// quasar: flexible_workgroups
// quasar: stage main = min(ceil_div(len_a, wg_x), max_wg)

@group(0) @binding(0) var<storage, read> a: array<f32>;
@group(0) @binding(1) var<storage, read> b: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

@compute @workgroup_size(256)
fn main(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let n = arrayLength(&out);
    let stride = groups.x * 256u;
    for (var i = gid.x; i < n; i += stride) {
        out[i] = a[i] + b[i];
    }
}
