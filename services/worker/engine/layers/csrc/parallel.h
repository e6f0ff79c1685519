// The kernels' parallel loop: at::parallel_for's contract on a pool whose threads claim chunks as they come.
#pragma once

#include <c10/util/FunctionRef.h>

#include <cstdint>

namespace tokenmill {

// f over disjoint [b, e) covering [begin, end), in chunks whose size is a multiple of `grain` (counted from
// begin); serial when there is a single chunk, one torch thread, or a call from inside another such loop.
// Unlike OpenMP's static split, nobody owns a share: the calling thread and the pool's helpers (torch's thread
// count - 1) take the next chunk until none is left, and the call returns once every taken chunk is done. A
// helper the OS has descheduled (the gateway, the client, a neighbour on a 2-core machine) has taken
// nothing, and the running threads do its share instead of waiting at a barrier for it. Which thread runs a
// chunk never changes a result: every kernel's arithmetic is per row or per panel.
void parallel_for(int64_t begin, int64_t end, int64_t grain, c10::function_ref<void(int64_t, int64_t)> f);

}  // namespace tokenmill
