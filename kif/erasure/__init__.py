"""kif.erasure: erasure operators behind one entry point, `kif.erase(model, concepts, method=...)`.

Methods come from one registry (`methods()`): `suppress` (gated suppression capsule, a hook
patch), `stamp` (closed-form pseudoinverse MLP edit), `kif` (signature -> suppression ->
parameter-efficient update) and the field's baselines (`ga`, `gradiff`, `npo`, `rmu`,
`sae-clamp`, `neuron-ablate`). Each returns an `Erasure`: a reversible weight delta or a hook
patch, tied to the base weights' SHA-256, saved as an erasure folder (`save_erasure`) that
`open_model` reopens and `restore` turns back into the base checkpoint bit for bit.
"""

from kif.erasure.core import AppliedErasure, Delta, Erasure, ErasureError, HookOp
from kif.erasure.io import is_erasure_folder, load_erasure, open_model, restore, save_erasure
from kif.erasure.registry import DEFAULT_METHOD, erase, make_config, methods

__all__ = ["AppliedErasure", "DEFAULT_METHOD", "Delta", "Erasure", "ErasureError", "HookOp",
           "erase", "is_erasure_folder", "load_erasure", "make_config", "methods", "open_model",
           "restore", "save_erasure"]
