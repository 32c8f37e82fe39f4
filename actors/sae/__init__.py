"""Registry of SAE architectures: a new architecture is one file plus one `register` line here.

An architecture defined outside this package registers itself with `register` when its module is imported; an
experiment names such modules in `sae.architecture_modules`, which the config and every training worker import
(the module must be importable on every node: an installed package, or part of `ray job submit`'s working dir).
"""

from __future__ import annotations

import importlib

from .base import SparseAutoencoder
from .batchtopk import BatchTopKSAE
from .gated import GatedSAE
from .jumprelu import JumpReLUSAE
from .matryoshka import MatryoshkaSAE
from .relu_l1 import ReluL1SAE
from .topk import TopKSAE

ARCHITECTURES: dict[str, type[SparseAutoencoder]] = {}


def register(cls: type[SparseAutoencoder]) -> type[SparseAutoencoder]:
    """Add an architecture under its `name` (usable as a class decorator); re-registering the same class is a no-op."""
    if ARCHITECTURES.get(cls.name, cls) is not cls:
        raise ValueError(f"architecture name {cls.name!r} is taken by {ARCHITECTURES[cls.name].__module__}."
                         f"{ARCHITECTURES[cls.name].__qualname__}")
    ARCHITECTURES[cls.name] = cls
    return cls


def architecture(name: str) -> type[SparseAutoencoder]:
    """The registered architecture called `name`. Code that runs in Ray tasks looks architectures up through this
    function rather than the dict: a `@ray.remote` function is pickled by value together with the globals it names,
    so a worker would get the driver's copy of the dict as it was when the function was first sent, missing the
    architectures registered since (here or by `import_architecture_modules` in the worker)."""
    try:
        return ARCHITECTURES[name]
    except KeyError:
        raise ValueError(f"no architecture named {name!r} is registered (known: {sorted(ARCHITECTURES)}); an "
                         "architecture defined outside actors/sae must be listed in sae.architecture_modules") from None


def import_architecture_modules(modules: list[str]) -> None:
    """Import modules that register architectures; a module that fails to import is named in the error."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            raise ValueError(f"architecture module {module!r} cannot be imported: {err}") from err


for _cls in (TopKSAE, ReluL1SAE, BatchTopKSAE, MatryoshkaSAE, JumpReLUSAE, GatedSAE):
    register(_cls)

__all__ = ["ARCHITECTURES", "SparseAutoencoder", "architecture", "import_architecture_modules", "register"]
