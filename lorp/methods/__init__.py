"""The selection-method registry: one module per method in this package.

Every public module here (a name not starting with ``_``) defines ``METHOD``, a
:class:`MethodInfo`: the method's name, one-line description, flags, scoring defaults, pass
budget, ``select`` entry point and the report's ``explain``. The modules are found by
:mod:`pkgutil` when this package is imported and ordered by ``MethodInfo.order``, so adding a
method is adding one file (and its test): the pipeline (:class:`lorp.pipeline.PruneConfig`),
:func:`lorp.selection.select_layers`, :func:`lorp.search.search_layers`,
:func:`lorp.search.pass_budget`, the ``lorp`` CLI's ``--method`` choices and help, the report's
names and prose, and the quality benchmark's method order all read this registry.

Importing the registry loads neither torch nor numpy, scikit-learn or transformers (a unit test
checks it): method files import what ``select`` needs inside it, so a process that only needs
the method names and descriptions (the REST API) stays light.

``S-only`` methods (``needs_model`` false) decide from the similarity matrix S alone;
model-in-the-loop methods (``needs_model``) also run the model on scoring windows
(:mod:`lorp.scoring`); a *fold* is another method's selection with corrections turned on.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Iterable, Iterator

from ..errors import InvalidInputError
from ._base import (
    DEFAULT_SCORING,
    HEAL_EVAL_EVERY,
    HEAL_LR,
    MAX_HEAL_STEPS,
    Fold,
    MethodInfo,
    PassBudget,
    SelectionRequest,
    generic_explain,
)

__all__ = [
    "DEFAULT_SCORING",
    "HEAL_EVAL_EVERY",
    "HEAL_LR",
    "MAX_HEAL_STEPS",
    "REGISTRY",
    "Fold",
    "MethodInfo",
    "PassBudget",
    "Registry",
    "SelectionRequest",
    "all_methods",
    "discover",
    "find_method",
    "fold_methods",
    "generic_explain",
    "get_method",
    "method_names",
    "selector",
]


class Registry:
    """Methods by name, in ``order``. Checks that names and orders are unique and that every
    fold names a registered method that is not itself a fold."""

    def __init__(self, methods: Iterable[MethodInfo]) -> None:
        ordered = sorted(methods, key=lambda m: (m.order, m.name))
        self._by_name: dict[str, MethodInfo] = {}
        orders: dict[int, str] = {}
        for info in ordered:
            if not isinstance(info, MethodInfo):
                raise TypeError(f"not a MethodInfo: {info!r}")
            if info.name in self._by_name:
                raise ValueError(f"method {info.name!r} is registered twice")
            if info.order in orders:
                raise ValueError(
                    f"methods {orders[info.order]!r} and {info.name!r} share order {info.order}"
                )
            self._by_name[info.name] = info
            orders[info.order] = info.name
        for info in ordered:
            if info.fold is not None:
                base = self._by_name.get(info.fold.of)
                if base is None or base.fold is not None:
                    raise ValueError(
                        f"method {info.name!r} folds {info.fold.of!r}, which is not a "
                        "registered selection method"
                    )

    def __iter__(self) -> Iterator[MethodInfo]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def find(self, name: object) -> MethodInfo | None:
        """The method called ``name``, or None (also for a name that is not a string)."""
        return self._by_name.get(name) if isinstance(name, str) else None

    def get(self, name: object) -> MethodInfo:
        """The method called ``name``; :class:`InvalidInputError` naming the valid ones."""
        info = self.find(name)
        if info is None:
            raise InvalidInputError(
                f"unknown method {name!r}; choose one of {', '.join(self._by_name)}"
            )
        return info

    def names(
        self,
        *,
        needs_model: bool | None = None,
        takes_clusters: bool | None = None,
        fold: bool | None = None,
    ) -> tuple[str, ...]:
        """Names in order, optionally only those with the given flags (``fold``: is a fold)."""
        return tuple(
            m.name
            for m in self
            if (needs_model is None or m.needs_model == needs_model)
            and (takes_clusters is None or m.takes_clusters == takes_clusters)
            and (fold is None or (m.fold is not None) == fold)
        )

    def with_methods(self, *methods: MethodInfo) -> Registry:
        """A new registry with ``methods`` added (e.g. a method defined outside this package)."""
        return Registry([*self, *methods])


def discover() -> Registry:
    """Import every public module of this package and register its ``METHOD``."""
    found: list[MethodInfo] = []
    for module in pkgutil.iter_modules(__path__):
        if module.name.startswith("_"):
            continue
        loaded = importlib.import_module(f"{__name__}.{module.name}")
        info = getattr(loaded, "METHOD", None)
        if not isinstance(info, MethodInfo):
            raise TypeError(f"{loaded.__name__} defines no METHOD (a lorp.methods.MethodInfo)")
        found.append(info)
    return Registry(found)


#: The registered methods. Read it through the functions below, which look it up when called.
REGISTRY: Registry = discover()


def all_methods() -> tuple[MethodInfo, ...]:
    """Every registered method, in order."""
    return tuple(REGISTRY)


def find_method(name: object) -> MethodInfo | None:
    """The method called ``name``, or None."""
    return REGISTRY.find(name)


def get_method(name: object) -> MethodInfo:
    """The method called ``name`` (:class:`InvalidInputError` if there is none)."""
    return REGISTRY.get(name)


def method_names(
    *, needs_model: bool | None = None, takes_clusters: bool | None = None, fold: bool | None = None
) -> tuple[str, ...]:
    """Registered names in order, filtered by flags (see :meth:`Registry.names`)."""
    return REGISTRY.names(needs_model=needs_model, takes_clusters=takes_clusters, fold=fold)


def fold_methods() -> dict[str, str]:
    """Fold name -> the method whose selection it uses."""
    return {m.name: m.fold.of for m in REGISTRY if m.fold is not None}


def selector(name: object) -> MethodInfo:
    """The method that chooses the blocks for ``name``: a fold's base, else ``name`` itself."""
    info = REGISTRY.get(name)
    return info if info.fold is None else REGISTRY.get(info.fold.of)
