// histogram: bins[i] = how many values v have min(v / bin_width, num_bins - 1) == i.
// Values past the last bin are counted in it, so no value is dropped.
//
// Each workgroup counts into its own copy of the bins in workgroup memory
// (cheap atomics), then adds its non-zero counts to the global bins.
//
// quasar: require num_bins >= 1 && num_bins <= 4096 else "num_bins must be between 1 and 4096"
// quasar: require bin_width >= 1 else "bin_width must be at least 1"
// quasar: output bins = num_bins
// quasar: flexible_workgroups
// quasar: stage main = min(ceil_div(len_values, wg_x), 1024)

struct Params {
    num_bins: u32,
    bin_width: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> values: array<u32>;
@group(0) @binding(2) var<storage, read_write> bins: array<atomic<u32>>;

var<workgroup> local_bins: array<atomic<u32>, 4096>;

@compute @workgroup_size(256)
fn main(
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
) {
    let bin_count = min(params.num_bins, 4096u);
    for (var i = lid.x; i < bin_count; i += 256u) {
        atomicStore(&local_bins[i], 0u);
    }
    workgroupBarrier();
    let n = arrayLength(&values);
    let stride = groups.x * 256u;
    for (var i = wid.x * 256u + lid.x; i < n; i += stride) {
        let bin = min(values[i] / max(params.bin_width, 1u), bin_count - 1u);
        atomicAdd(&local_bins[bin], 1u);
    }
    workgroupBarrier();
    for (var i = lid.x; i < bin_count; i += 256u) {
        let count = atomicLoad(&local_bins[i]);
        if (count != 0u) {
            atomicAdd(&bins[i], count);
        }
    }
}
