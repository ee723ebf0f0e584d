"""The torch.compile graph pass: find attention in FX graphs, replace it with attncc kernels.

Use it as a dynamo backend::

    model = torch.compile(model, backend="attncc")        # rewrite, then inductor
    model = torch.compile(model, backend=attncc.fx.make_backend(inner="eager"))

or on a graph directly: ``gm, report = attncc.fx.rewrite(gm, example_inputs)``.

Every attention site found (``scaled_dot_product_attention`` calls and hand-written
``matmul -> softmax -> matmul`` chains) is logged at INFO on the ``attncc`` logger,
replaced (with the inferred pattern) or left alone (with the reason); the backend keeps
the reports of the graphs it compiled (:func:`reports`). Code the pass does not
understand is left exactly as it was.
"""

from __future__ import annotations

from typing import List

import torch

from .match import Report, SiteReport, rewrite
from .site import Site, attention, kernel_for, spec_text

_REPORTS: List[Report] = []


def reports() -> List[Report]:
    """The reports of the graphs the backend has compiled in this process, oldest first
    (one per dynamo graph; clear with :func:`clear_reports`)."""
    return list(_REPORTS)


def clear_reports() -> None:
    """Forget the reports kept by the backend."""
    _REPORTS.clear()


def make_backend(inner="inductor"):
    """A dynamo backend that rewrites attention, then hands the graph to ``inner``.

    Args:
        inner: a backend name (``"inductor"``, ``"eager"``, ``"aot_eager"``, ...) or a
            backend callable ``(gm, example_inputs) -> callable``.

    Returns:
        A backend callable for ``torch.compile(..., backend=...)``.
    """

    def attncc_backend(gm: torch.fx.GraphModule, example_inputs):
        gm, report = rewrite(gm, example_inputs)
        _REPORTS.append(report)
        if inner == "eager":
            return gm.forward
        fn = torch._dynamo.lookup_backend(inner) if isinstance(inner, str) else inner
        return fn(gm, example_inputs)

    attncc_backend.__doc__ = f"attncc graph pass, then the {inner!r} backend."
    return attncc_backend


#: the ``"attncc"`` dynamo backend (rewrite, then inductor); also the
#: ``torch_dynamo_backends`` entry point
backend = make_backend("inductor")


def _register() -> None:
    from torch._dynamo.backends.registry import _BACKENDS, register_backend

    if _BACKENDS.get("attncc") is None:  # absent, or an entry point not loaded yet
        _BACKENDS.pop("attncc", None)
        register_backend(backend, name="attncc")


_register()

__all__ = ["backend", "make_backend", "rewrite", "reports", "clear_reports", "Report", "SiteReport", "Site",
           "spec_text", "kernel_for", "attention"]
