"""Backends by name: a backend is one module with a `load()` function, registered here.

`load(directory, *, name, device, dtype, **options) -> LanguageModel` receives the model directory (or
file) as given, the name the model is reported under, the device asked for (None: the backend's
default), a torch dtype or None (the backend's default) and the engine options; it checks the
directory's format itself.  The CLI's `--backend` choices, the `.steer` model options and
`load_model` all read this registry, so registering a backend in one place makes it usable everywhere:

    steer.lm.register_backend("mine", load, "my engine")       # in-process

or, from an installed package, an entry point in the `steer.backends` group naming its module (whose
`load` is used) or the function itself.  The built-in backends are listed by module path, so a heavy
optional dependency (vLLM) is imported only when its backend is used.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points

from ..errors import ModelLoadError
from .base import LanguageModel

Loader = Callable[..., LanguageModel]


@dataclass(frozen=True)
class Backend:
    name: str
    target: str | Loader  # "package.module" (its `load`), "package.module:function", or the function
    description: str

    def loader(self) -> Loader:
        if callable(self.target):
            return self.target
        module, _, function = self.target.partition(":")
        return getattr(importlib.import_module(module), function or "load")


_REGISTERED: dict[str, Backend] = {
    "hf": Backend("hf", "steer.lm.hf", "transformers, float32 unless --dtype says otherwise (default)"),
    "vllm": Backend("vllm", "steer.lm.vllm", "a vLLM engine, bfloat16 unless --dtype says otherwise "
                                             "(needs vLLM installed)"),
}


def register_backend(name: str, load: str | Loader, description: str = "") -> None:
    """Make `name` a backend: `load` is the loading function or the module that defines `load`."""
    _REGISTERED[name] = Backend(name, load, description or name)


def backends() -> dict[str, Backend]:
    """Every backend: the built-in ones, those registered in this process and those installed packages
    declare (entry points in the `steer.backends` group)."""
    found = {e.name: Backend(e.name, e.value, f"from {e.value}") for e in entry_points(group="steer.backends")}
    return {**found, **_REGISTERED}


def backend_names() -> tuple[str, ...]:
    return tuple(backends())


def backend(name: str) -> Backend:
    found = backends().get(name)
    if found is None:
        raise ModelLoadError(f"unknown backend {name!r}; choose one of {', '.join(backends())}")
    return found
