// matmul: c = a x b for dense row-major f32 matrices, a is m x k, b is k x n,
// c is m x n. Tiled: each 16x16 workgroup stages one tile of a and one of b
// in workgroup memory per step along k, so each global element is read
// k/16 times instead of k times.
//
// quasar: require m >= 1 && n >= 1 && k >= 1 else "m, n and k must be at least 1"
// quasar: require len_a == m * k else "a must have m*k elements"
// quasar: require len_b == k * n else "b must have k*n elements"
// quasar: output c = m * n
// quasar: stage main = (ceil_div(n, wg_x), ceil_div(m, wg_y))

struct Dims {
    m: u32,
    n: u32,
    k: u32,
}

@group(0) @binding(0) var<uniform> dims: Dims;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> c: array<f32>;

const TILE: u32 = 16u;
var<workgroup> tile_a: array<array<f32, 16>, 16>;
var<workgroup> tile_b: array<array<f32, 16>, 16>;

@compute @workgroup_size(16, 16)
fn main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
) {
    let row = wid.y * TILE + lid.y;
    let col = wid.x * TILE + lid.x;
    var acc = 0.0;
    let steps = (dims.k + TILE - 1u) / TILE;
    for (var t = 0u; t < steps; t++) {
        let a_col = t * TILE + lid.x;
        var va = 0.0;
        if (row < dims.m && a_col < dims.k) {
            va = a[row * dims.k + a_col];
        }
        tile_a[lid.y][lid.x] = va;
        let b_row = t * TILE + lid.y;
        var vb = 0.0;
        if (b_row < dims.k && col < dims.n) {
            vb = b[b_row * dims.n + col];
        }
        tile_b[lid.y][lid.x] = vb;
        workgroupBarrier();
        for (var i = 0u; i < TILE; i++) {
            acc += tile_a[lid.y][i] * tile_b[i][lid.x];
        }
        workgroupBarrier();
    }
    if (row < dims.m && col < dims.n) {
        c[row * dims.n + col] = acc;
    }
}
