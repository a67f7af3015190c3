"""jaxattn's kernels for GPUs and TPUs, written in Pallas: flash attention (forward and
backward) and decode attention over a contiguous or paged cache. They read the same call
context and form their logits with the same function as the XLA kernels; on a CPU they run
in interpret mode. ``platforms.py`` holds what differs by chip."""

from jaxattn.functional.pallas.decode import pallas_decode_attention, pallas_decode_kernel
from jaxattn.functional.pallas.flash import pallas_attention, pallas_kernel

__all__ = ["pallas_attention", "pallas_decode_attention", "pallas_decode_kernel", "pallas_kernel"]
