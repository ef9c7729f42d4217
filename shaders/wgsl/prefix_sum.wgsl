// prefix_sum: output[i] = input[0] + ... + input[i-1] (exclusive scan of u32,
// wrapping on overflow like the CPU reference).
//
// A three-level block scan, all in one submission. Blocks are 1024 elements
// (256 threads x 4). Level 0 scans each block of the input and writes block
// totals to sums0; level 1 scans sums0 in place and writes its block totals
// to sums1; level 2 scans sums1 (one block). Then the scanned totals are
// added back down: sums1 into sums0, sums0 into the output. Three levels
// cover 1024^3 = 2^30 elements, more than the payload limit allows.
//
// quasar: output output = len_input
// quasar: scratch sums0 = ceil_div(len_input, 1024)
// quasar: scratch sums1 = ceil_div(len_sums0, 1024)
// quasar: scratch sums2 = 1
// quasar: require len_sums1 <= 1024 else "input longer than 2^30 elements"
// quasar: stage scan_input = min(ceil_div(len_input, 1024), max_wg)
// quasar: stage scan_sums0 = min(ceil_div(len_sums0, 1024), max_wg)
// quasar: stage scan_sums1 = 1
// quasar: stage add_sums1 = min(ceil_div(len_sums0, wg_x), max_wg)
// quasar: stage add_sums0 = min(ceil_div(len_input, wg_x), max_wg)

@group(0) @binding(0) var<storage, read> input: array<u32>;
@group(0) @binding(1) var<storage, read_write> output: array<u32>;
@group(0) @binding(2) var<storage, read_write> sums0: array<u32>;
@group(0) @binding(3) var<storage, read_write> sums1: array<u32>;
@group(0) @binding(4) var<storage, read_write> sums2: array<u32>;

const BLOCK: u32 = 1024u;
var<workgroup> tile: array<u32, 1024>;
var<workgroup> totals: array<u32, 256>;

// Exclusive scan of tile[0..1024] in place; returns the block's total.
// Each thread scans its 4 consecutive elements, the 256 thread totals are
// scanned (Hillis-Steele), and each thread adds its prefix back.
fn scan_tile(lid: u32) -> u32 {
    let base = lid * 4u;
    var run = 0u;
    for (var k = 0u; k < 4u; k++) {
        let v = tile[base + k];
        tile[base + k] = run;
        run += v;
    }
    totals[lid] = run;
    workgroupBarrier();
    for (var offset = 1u; offset < 256u; offset <<= 1u) {
        var t = 0u;
        if (lid >= offset) {
            t = totals[lid - offset];
        }
        workgroupBarrier();
        totals[lid] += t;
        workgroupBarrier();
    }
    let prefix = totals[lid] - run;
    for (var k = 0u; k < 4u; k++) {
        tile[base + k] += prefix;
    }
    let total = totals[255];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(256)
fn scan_input(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let n = arrayLength(&input);
    let blocks = (n + BLOCK - 1u) / BLOCK;
    for (var b = wid.x; b < blocks; b += groups.x) {
        for (var k = 0u; k < 4u; k++) {
            let j = lid.x + k * 256u;
            let i = b * BLOCK + j;
            var v = 0u;
            if (i < n) {
                v = input[i];
            }
            tile[j] = v;
        }
        workgroupBarrier();
        let total = scan_tile(lid.x);
        for (var k = 0u; k < 4u; k++) {
            let j = lid.x + k * 256u;
            let i = b * BLOCK + j;
            if (i < n) {
                output[i] = tile[j];
            }
        }
        if (lid.x == 0u) {
            sums0[b] = total;
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn scan_sums0(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let n = arrayLength(&sums0);
    let blocks = (n + BLOCK - 1u) / BLOCK;
    for (var b = wid.x; b < blocks; b += groups.x) {
        for (var k = 0u; k < 4u; k++) {
            let j = lid.x + k * 256u;
            let i = b * BLOCK + j;
            var v = 0u;
            if (i < n) {
                v = sums0[i];
            }
            tile[j] = v;
        }
        workgroupBarrier();
        let total = scan_tile(lid.x);
        for (var k = 0u; k < 4u; k++) {
            let j = lid.x + k * 256u;
            let i = b * BLOCK + j;
            if (i < n) {
                sums0[i] = tile[j];
            }
        }
        if (lid.x == 0u) {
            sums1[b] = total;
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(256)
fn scan_sums1(@builtin(local_invocation_id) lid: vec3<u32>) {
    let n = arrayLength(&sums1);
    for (var k = 0u; k < 4u; k++) {
        let j = lid.x + k * 256u;
        var v = 0u;
        if (j < n) {
            v = sums1[j];
        }
        tile[j] = v;
    }
    workgroupBarrier();
    let total = scan_tile(lid.x);
    for (var k = 0u; k < 4u; k++) {
        let j = lid.x + k * 256u;
        if (j < n) {
            sums1[j] = tile[j];
        }
    }
    if (lid.x == 0u) {
        sums2[0] = total;
    }
}

@compute @workgroup_size(256)
fn add_sums1(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let n = arrayLength(&sums0);
    let stride = groups.x * 256u;
    for (var i = gid.x; i < n; i += stride) {
        sums0[i] += sums1[i / BLOCK];
    }
}

@compute @workgroup_size(256)
fn add_sums0(
    @builtin(global_invocation_id) gid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let n = arrayLength(&output);
    let stride = groups.x * 256u;
    for (var i = gid.x; i < n; i += stride) {
        output[i] += sums0[i / BLOCK];
    }
}
