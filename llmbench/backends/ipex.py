"""Intel Extension for PyTorch's ipex.llm.optimize, where it installs.

IPEX is archived upstream and pins old torch/transformers releases, so it is optional: when it
does not import, stop and say how to get it rather than run something else under its name.
"""

from __future__ import annotations

from typing import Any

from llmbench.backends.prepared import PreparedModel
from llmbench.errors import UserError

HOW_TO_GET_IT = ("install intel-extension-for-pytorch with the torch and transformers releases it "
                 "was built for (e.g. ipex 2.8 needs torch 2.8 and transformers 4.51.3) in a "
                 "separate environment, or run without --ipex")


def require_ipex() -> Any:
    """The ipex module, or one line saying why it doesn't import here and how to get it."""
    try:
        import intel_extension_for_pytorch as ipex  # type: ignore[import-not-found]
    except Exception as exc:  # ImportError, or an ABI mismatch raising anything
        raise UserError(f"--ipex: Intel Extension for PyTorch does not import here "
                        f"({type(exc).__name__}: {exc}); {HOW_TO_GET_IT}") from exc
    return ipex


def prepare(model: Any, *, dtype: str, family: str) -> PreparedModel:
    ipex = require_ipex()
    import torch

    try:
        optimized = ipex.llm.optimize(model.eval(), dtype=getattr(torch, dtype), inplace=True,
                                      deployment_mode=True)
    except Exception as exc:
        raise UserError(f"--ipex: ipex.llm.optimize failed for family '{family}': {exc}") from exc
    return PreparedModel(model=optimized, backend="ipex",
                         details={"ipex_version": getattr(ipex, "__version__", None)})
