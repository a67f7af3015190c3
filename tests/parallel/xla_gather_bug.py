"""A minimal reproduction of the XLA bug behind jaxattn.lm.parallel's embedding constraint.

    python tests/parallel/xla_gather_bug.py

On 8 CPU devices in a 2 x 2 x 2 mesh, a gather (``table[ids]``) whose table is split over
one mesh axis and whose ids are split over the same axis returns wrong rows when its
output is asked to be split over all three axes; constraining the output to the ids'
layout first gives the right rows. Seen with jax/jaxlib 0.10.2 under both partitioners
(Shardy and GSPMD). Exit code 0 when the bug is present and the workaround holds, 1 when
XLA has been fixed (then the workaround may go), 2 when the workaround fails.
"""

import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def gather_error(constrain_first: bool) -> float:
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("a", "b", "c"))
    table = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)  # [V, C]
    ids = np.array([[1, 6], [3, 4]], np.int32)  # [B, T]

    def lookup(table, ids):
        out = table[ids]  # [B, T, C]
        if constrain_first:
            out = jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P("a", None, None)))
        return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P("a", "b", "c")))

    out = jax.jit(lookup)(jax.device_put(table, NamedSharding(mesh, P("a", None))),
                          jax.device_put(ids, NamedSharding(mesh, P("a", None))))
    return float(np.abs(np.asarray(out) - table[ids]).max())


if __name__ == "__main__":
    bug, workaround = gather_error(False), gather_error(True)
    print(f"jax {jax.__version__}: largest error {bug} as asked, {workaround} with the output laid out like the ids first")
    sys.exit(2 if workaround else 0 if bug else 1)
