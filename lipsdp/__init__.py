"""lipsdp: certified upper bounds on the Lipschitz constant of neural networks.

``import lipsdp`` is light: it imports neither torch nor any solver backend.
The heavy parts load when used.

>>> import lipsdp
>>> cert = lipsdp.certify("model.pt")          # doctest: +SKIP
>>> cert.bound, cert.status                      # doctest: +SKIP
"""

from __future__ import annotations

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


def __getattr__(name):
    # Lazy attributes keep `import lipsdp` free of scipy-heavy and torch imports.
    if name in ("certify", "certify_network"):
        from lipsdp import pipeline
        return getattr(pipeline, name)
    if name == "Certificate":
        from lipsdp.certificate import Certificate
        return Certificate
    if name == "Network":
        from lipsdp.network import Network
        return Network
    if name in ("certified_radii", "pairwise_lipschitz"):
        from lipsdp import robustness
        return getattr(robustness, name)
    if name == "load_network":
        from lipsdp.io import load_network
        return load_network
    raise AttributeError(f"module 'lipsdp' has no attribute {name!r}")


__all__ = ["certify", "certify_network", "Certificate", "Network", "load_network", "LipSDPError",
           "ModelLoadError", "UnsafeModelError", "UnsupportedLayerError", "InvalidNetworkError",
           "SolverNotFound", "SolverLicenseError", "SolverError", "ResourceError", "WellPosednessError",
           "__version__"]
