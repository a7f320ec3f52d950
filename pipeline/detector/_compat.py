"""Make detectron2 v0.6 importable on this stack; call `ensure_detectron2()` before importing it.

Why: the registry's detectron2 v0.6 installs as pure Python (DEPENDENCIES.md),
so `detectron2._C` (its compiled ops) is missing, and three layer modules
import it at load time although nothing on the C4 inference path calls it
(NMS and RoIAlign come from torchvision). detectron2 0.6 also names
`PIL.Image.LINEAR`, removed in Pillow 10; we alias it rather than pin an old
Pillow, because the product decodes untrusted images. A real detectron2 build
(with `_C`) is used untouched.
"""
from __future__ import annotations

import importlib.util
import sys
import types
import warnings

_SHIMMED = False
_LOADED = False


def ensure_detectron2(load: bool = True) -> None:
    """Idempotent: register an empty `detectron2._C` if absent and alias `PIL.Image.LINEAR`;
    with `load`, also import detectron2.modeling (quietly). `pipeline.detector` calls it
    with load=False on import, so user code importing detectron2 afterwards works too."""
    global _SHIMMED, _LOADED
    if _LOADED or (_SHIMMED and not load):
        return
    if not _SHIMMED:
        _shim()
        _SHIMMED = True
    if load:
        with warnings.catch_warnings():
            # torch>=2.10 deprecates torch.jit.script, which detectron2 0.6 uses at import time.
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=UserWarning)
            import detectron2.modeling  # noqa: F401
        _LOADED = True


def _shim() -> None:
    import PIL.Image

    if not hasattr(PIL.Image, "LINEAR"):
        PIL.Image.LINEAR = PIL.Image.BILINEAR  # type: ignore[attr-defined]
    if "detectron2._C" not in sys.modules:
        try:
            found = importlib.util.find_spec("detectron2._C") is not None
        except ModuleNotFoundError:  # detectron2 itself missing: let the import below say so
            found = True
        if not found:
            stub = types.ModuleType("detectron2._C")
            stub.__doc__ = "placeholder registered by vlmixer: this detectron2 has no compiled ops"
            sys.modules["detectron2._C"] = stub
