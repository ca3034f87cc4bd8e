"""The bytes a network's fingerprint (``Network.sha256``) hashes for one weight array.

Small arrays hash as dense float64 bytes, so certificates keep their ``sha256``; matrices above
:data:`SPARSE_HASH_ENTRIES` entries (unrolled convolutions) hash their canonical CSR arrays instead of
gigabytes of dense zeros.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

#: Larger matrices hash their canonical CSR arrays, not gigabytes of dense zeros (smaller: sha256 unchanged).
SPARSE_HASH_ENTRIES = 2 ** 24


def hash_array(h, a) -> None:
    """Feed ``a`` (dense or sparse) into the hash object ``h``."""
    if len(a.shape) == 2 and a.shape[0] * a.shape[1] > SPARSE_HASH_ENTRIES:  # whether stored dense or sparse
        csr = sp.csr_matrix(a, dtype=np.float64, copy=True)
        csr.sum_duplicates()
        csr.eliminate_zeros()
        h.update(f"csr{tuple(a.shape)}".encode())
        for part in (csr.indptr.astype(np.int64), csr.indices.astype(np.int64), csr.data):
            h.update(np.ascontiguousarray(part).tobytes())
        return
    a = a.toarray() if sp.issparse(a) else np.asarray(a)
    h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
