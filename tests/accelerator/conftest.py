"""The device checks run only where there is a device: on a CPU machine nothing here is collected
(the same kernels are proven there in interpret mode and by lowering: tests/functional/test_pallas.py)."""

import jax

if jax.devices()[0].platform == "cpu":
    collect_ignore_glob = ["test_*.py"]
