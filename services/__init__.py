"""tokenmill's services: gateway, worker, judge and what they share."""

import os

# tokenmill's C++ kernels run on their own thread pool (worker/engine/layers/csrc/parallel.cpp). OpenMP threads
# that spin after torch's own parallel ops (sampling over the vocabulary, float GEMMs) would hold the cores the
# pool's threads need: a batch of 8 decoded 1.5x slower on 2 cores. So they sleep as soon as they are idle
# (float weights' decode measured the same either way). libgomp reads this once, when torch loads it: it is set
# here, before any service imports torch; a setting of the user's wins.
OMP_POLICY_SET_HERE = "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
if OMP_POLICY_SET_HERE:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


def foreign_env() -> dict[str, str]:
    """The environment for another program (a peer server in a benchmark): without the wait policy set above,
    which would slow an OpenMP program that relies on spinning (llama.cpp served 2.7x fewer tokens/s)."""
    env = dict(os.environ)
    if OMP_POLICY_SET_HERE:
        env.pop("OMP_WAIT_POLICY", None)
    return env
