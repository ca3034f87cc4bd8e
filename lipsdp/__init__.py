"""lipsdp: certified upper bounds on the Lipschitz constant of neural networks.

``import lipsdp`` is light: it imports neither torch nor any solver backend.
The heavy parts load when used.

>>> import lipsdp
>>> cert = lipsdp.certify("model.pt")          # doctest: +SKIP
>>> cert.bound, cert.status                      # doctest: +SKIP
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

from lipsdp.errors import (  # noqa: F401  (re-exported)
    InvalidNetworkError,
    LipSDPError,
    ModelLoadError,
    ResourceError,
    SolverError,
    SolverLicenseError,
    SolverNotFound,
    UnsafeModelError,
    UnsupportedLayerError,
    WellPosednessError,
)


#: Public names that load on first use (name -> module): ``import lipsdp`` stays free of torch,
#: scipy-heavy modules and solver backends until one of these is touched.
_LAZY = {
    "certify": "lipsdp.pipeline",
    "certify_network": "lipsdp.pipeline",
    "Certificate": "lipsdp.certificate",
    "Network": "lipsdp.network",
    "certified_radii": "lipsdp.robustness",
    "pairwise_lipschitz": "lipsdp.robustness",
    "load_network": "lipsdp.io",
    "monotone": "lipsdp.monotonicity",
    "compose": "lipsdp.composition",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lipsdp' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["certify", "certify_network", "compose", "certified_radii", "pairwise_lipschitz", "monotone",
           "Certificate", "Network",
           "load_network", "LipSDPError", "ModelLoadError", "UnsafeModelError", "UnsupportedLayerError",
           "InvalidNetworkError", "SolverNotFound", "SolverLicenseError", "SolverError", "ResourceError",
           "WellPosednessError", "__version__"]
