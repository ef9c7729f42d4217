// reduce_sum: sum[0] = the sum of every element of input.
//
// Two stages in one submission: up to 256 workgroups each reduce a strided
// share of the input into partials[workgroup], then one workgroup reduces the
// partials. Any length works; the tail needs no padding because each thread
// only reads indices below arrayLength.
//
// quasar: output sum = 1
// quasar: scratch partials = 256
// quasar: stage partial = min(ceil_div(len_input, wg_x), len_partials)
// quasar: stage finish = 1

@group(0) @binding(0) var<storage, read> input: array<f32>;
@group(0) @binding(1) var<storage, read_write> partials: array<f32>;
@group(0) @binding(2) var<storage, read_write> sum: array<f32>;

var<workgroup> tile: array<f32, 256>;

// Tree reduction of tile[0..256] into tile[0].
fn reduce_tile(lid: u32) {
    for (var s = 128u; s > 0u; s >>= 1u) {
        if (lid < s) {
            tile[lid] += tile[lid + s];
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn partial(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let n = arrayLength(&input);
    let stride = groups.x * 256u;
    var acc = 0.0;
    for (var i = wid.x * 256u + lid.x; i < n; i += stride) {
        acc += input[i];
    }
    tile[lid.x] = acc;
    workgroupBarrier();
    reduce_tile(lid.x);
    if (lid.x == 0u) {
        partials[wid.x] = tile[0];
    }
}

@compute @workgroup_size(256)
fn finish(@builtin(local_invocation_id) lid: vec3<u32>) {
    let n = arrayLength(&partials);
    var acc = 0.0;
    for (var i = lid.x; i < n; i += 256u) {
        acc += partials[i];
    }
    tile[lid.x] = acc;
    workgroupBarrier();
    reduce_tile(lid.x);
    if (lid.x == 0u) {
        sum[0] = tile[0];
    }
}
