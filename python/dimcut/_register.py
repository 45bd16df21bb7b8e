"""Registering the `slicegpt` format's model class with transformers, without importing
transformers (or torch) at `import dimcut`.

If transformers is already imported, the classes are registered at once; otherwise a one-shot
import hook registers them right after transformers itself is imported. Either way
`import dimcut` then `AutoModelForCausalLM.from_pretrained(out)` works, and `dimcut --help` or
`dimcut fit` never pay for torch.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings


def register_now() -> None:
    # Importing the module registers its classes, once it has finished executing: this also holds
    # when transformers is first imported *by* modeling_dimcut (then the module is in progress).
    importlib.import_module("dimcut.modeling_dimcut")


class _AfterTransformersImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: it wraps the real loader of `transformers` so that registration
    runs once that module has been executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "transformers":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps the lookup below from recursing
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            try:
                register_now()
            except Exception as exc:  # noqa: BLE001 -- never break the user's import of transformers
                warnings.warn(f"dimcut could not register its model class: {exc}", stacklevel=2)

        spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    if sys.modules.get("transformers") is not None:
        register_now()
    elif not any(isinstance(f, _AfterTransformersImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformersImport())
