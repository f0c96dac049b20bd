"""Register the "ragkern" attention with transformers as soon as transformers' model code is imported.

``import ragkern`` must make ``from_pretrained(..., attn_implementation="ragkern")`` work, but must not import
torch and transformers itself (``ragkern --help`` would take seconds). So: if ``transformers.modeling_utils``
(where ``AttentionInterface`` lives) is already imported, register now; otherwise a one-shot import hook
registers right after it is first imported, before any model can be built.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

_TARGET = "transformers.modeling_utils"


def _register() -> None:
    # ragkern.attention registers itself when its module body has run; it may be the module whose import of
    # transformers brought us here, half initialised: then it registers on its own a moment later.
    if "ragkern.attention" not in sys.modules:
        importlib.import_module("ragkern.attention")


class _RegisteringLoader(importlib.abc.Loader):
    """The real loader of ``transformers.modeling_utils``, registering the attention once it has run."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module):
        self._inner.exec_module(module)
        _register()

    def __getattr__(self, name):  # get_source, get_filename, ... of the real loader
        return getattr(self._inner, name)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from finding this hook again
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisteringLoader(spec.loader)
        return spec


def register_when_transformers_loads() -> None:
    """Register the "ragkern" attention now if transformers' model code is loaded, else right after it is."""
    if _TARGET in sys.modules:
        _register()
    elif not any(isinstance(f, _Hook) for f in sys.meta_path):
        sys.meta_path.insert(0, _Hook())
