"""rkedge's SIMULATED rkllm-toolkit: a package named ``rkllm`` whose ``rkllm.api.RKLLM`` behaves like the vendor's.

It is put on the worker's path only for ``--toolkit mock`` and by tests; it writes rkedge simulated models
(never loadable by a real board runtime). The simulated version comes from ``$RKEDGE_SIM_TOOLKIT_VERSION``.
"""

from __future__ import annotations

import os

#: Read by the worker: a simulated toolkit reports its own version instead of a distribution's.
__rkedge_simulated__ = True
__version__ = os.environ.get("RKEDGE_SIM_TOOLKIT_VERSION") or "1.3.0"
