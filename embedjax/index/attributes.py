"""Named corpus attributes and the predicates that filter a search by them.

    attrs = Attributes.from_columns(categorical={"source": sources_n, "lang": langs_n},
                                    numeric={"year": years_n})
    flt = AttributeFilter(attrs, Eq("source", "scifact") & Range("year", 2010, 2020))   # one filter, every query
    flt = AttributeFilter(attrs, [Eq("lang", l) for l in query_langs])                # one per query (None = no filter)
    scores, ids = search_embeddings(q, d, 10, filter=flt)

Predicates: ``Eq(name, value)`` (equality; a categorical value the corpus never has
matches no row), ``Range(name, lo, hi)`` (``lo <= v < hi`` on a numeric attribute;
None = unbounded) and their conjunction with ``&``. Numeric values are stored as
float32 and compared in float32 (bounds are rounded so that the comparison equals
the float64 one on the stored values). Categorical values are any sortable scalars
(strings, ints), stored as codes.

A filter compiles to the kernels' ``RowPredicates`` (``kernels.row_filter``): one
attribute column per attribute the predicates name, and per-query closed bounds,
so the kernels evaluate it tile by tile without a [Q, N] mask.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

import numpy as np

from embedjax.kernels.row_filter import RowPredicates

KINDS = ("categorical", "numeric")


@dataclasses.dataclass(frozen=True)
class Attributes:
    """Per-row attributes of a corpus. ``values[name]`` float32 [N] (codes for categoricals)."""

    values: Mapping[str, np.ndarray]
    kinds: Mapping[str, str]
    categories: Mapping[str, tuple]  # categorical name -> value of code 0, 1, ...

    @classmethod
    def from_columns(cls, categorical: Mapping[str, Sequence] | None = None,
                     numeric: Mapping[str, Sequence] | None = None) -> "Attributes":
        """Columns of equal length N; categoricals of any sortable scalars, numerics of numbers."""
        values, kinds, categories = {}, {}, {}
        for name, column in (categorical or {}).items():
            column = np.asarray(column)
            if column.ndim != 1:
                raise ValueError(f"categorical attribute {name!r} must be one value per row [N]; "
                                 f"got shape {column.shape}")
            cats, codes = np.unique(column, return_inverse=True)
            if len(cats) > 2 ** 24:
                raise ValueError(f"categorical attribute {name!r} has {len(cats)} values; at most 2^24 fit float32 codes")
            values[name], kinds[name] = codes.astype(np.float32), "categorical"
            categories[name] = tuple(c.item() if hasattr(c, "item") else c for c in cats)
        for name, column in (numeric or {}).items():
            if name in values:
                raise ValueError(f"attribute {name!r} is given as both categorical and numeric")
            column = np.asarray(column)
            if column.ndim != 1 or not (np.issubdtype(column.dtype, np.number) or column.dtype == bool):
                raise ValueError(f"numeric attribute {name!r} must be numbers, one per row [N]; "
                                 f"got {column.dtype} {column.shape}")
            if not np.all(np.isfinite(column)):
                raise ValueError(f"numeric attribute {name!r} has NaN or infinite values; give every row a number")
            values[name], kinds[name] = column.astype(np.float32), "numeric"
        if not values:
            raise ValueError("Attributes needs at least one categorical or numeric column")
        lengths = {name: len(v) for name, v in values.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"attribute columns have different lengths {lengths}; give every column one value per "
                             "corpus row")
        return cls(values, kinds, categories)

    @property
    def num_rows(self) -> int:
        return len(next(iter(self.values.values())))

    @property
    def names(self) -> tuple:
        return tuple(self.values)

    def check_name(self, name: str) -> str:
        if name not in self.values:
            raise ValueError(f"unknown attribute {name!r}; the corpus has: {', '.join(self.names)}")
        return self.kinds[name]

    def column(self, name: str) -> np.ndarray:
        """The stored float32 column (categorical codes for categoricals)."""
        self.check_name(name)
        return self.values[name]

    def decoded(self, name: str) -> np.ndarray:
        """The column's values as given (categories for categoricals)."""
        if self.check_name(name) == "numeric":
            return self.values[name]
        return np.asarray(self.categories[name], dtype=object)[self.values[name].astype(np.int64)]

    def take(self, rows) -> "Attributes":
        """The attributes of corpus rows ``rows`` (same categories)."""
        rows = np.asarray(rows)
        return Attributes({n: v[rows] for n, v in self.values.items()}, dict(self.kinds), dict(self.categories))

    def save(self, path) -> None:
        header = {"kinds": dict(self.kinds), "categories": {n: list(c) for n, c in self.categories.items()}}
        with open(path, "wb") as f:
            np.savez_compressed(f, header=np.frombuffer(json.dumps(header).encode(), np.uint8),
                                **{f"value_{n}": v for n, v in self.values.items()})

    @classmethod
    def load(cls, path) -> "Attributes":
        with np.load(path, allow_pickle=False) as z:
            if "header" not in z:
                raise ValueError(f"{path} is not an Attributes file (no header); write it with Attributes.save")
            header = json.loads(bytes(z["header"]).decode())
            values = {n: z[f"value_{n}"] for n in header["kinds"]}
        return cls(values, header["kinds"], {n: tuple(c) for n, c in header["categories"].items()})


# ------------------------------------------------------------------ predicates


class _Predicate:
    def __and__(self, other: "_Predicate") -> "And":
        if not isinstance(other, _Predicate):
            return NotImplemented
        return And(tuple(_terms(self)) + tuple(_terms(other)))


@dataclasses.dataclass(frozen=True)
class Eq(_Predicate):
    """``attribute == value``."""

    attribute: str
    value: Any


@dataclasses.dataclass(frozen=True)
class Range(_Predicate):
    """``lo <= attribute < hi`` on a numeric attribute (None = unbounded)."""

    attribute: str
    lo: float | None = None
    hi: float | None = None


@dataclasses.dataclass(frozen=True)
class And(_Predicate):
    """Every term holds."""

    terms: tuple


def _terms(p):
    return p.terms if isinstance(p, And) else (p,)


def _float32_at_least(x: float) -> np.float32:
    """The smallest float32 >= x."""
    f = np.float32(x)
    return np.nextafter(f, np.float32(np.inf)) if float(f) < x else f


def _float32_below(x: float) -> np.float32:
    """The largest float32 < x."""
    f = np.float32(x)
    return np.nextafter(f, np.float32(-np.inf)) if float(f) >= x else f


def _bounds(attrs: Attributes, term) -> tuple[str, float, float]:
    """(attribute, lo, hi) closed float32 bounds of one Eq / Range term."""
    if isinstance(term, And):
        raise TypeError("nested And: combine predicates with & (it flattens them)")
    if not isinstance(term, (Eq, Range)):
        raise TypeError(f"a filter predicate must be Eq, Range or their & ; got {type(term).__name__}")
    kind = attrs.check_name(term.attribute)
    empty = (term.attribute, np.inf, -np.inf)
    if isinstance(term, Eq):
        if kind == "categorical":
            cats = attrs.categories[term.attribute]
            if term.value not in cats:
                return empty  # a value no row has: nothing passes
            code = float(cats.index(term.value))
            return term.attribute, code, code
        value = float(term.value)
        if float(np.float32(value)) != value:
            return empty  # stored values are float32: none can equal a value float32 cannot hold
        return term.attribute, value, value
    if kind == "categorical":
        raise ValueError(f"Range on the categorical attribute {term.attribute!r}; use Eq (one value) instead")
    lo = -np.inf if term.lo is None else float(_float32_at_least(float(term.lo)))
    hi = np.inf if term.hi is None else float(_float32_below(float(term.hi)))
    return term.attribute, lo, hi


class AttributeFilter:
    """A filter over named attributes: one predicate for every query, or one per query.

    ``predicates``: an ``Eq`` / ``Range`` / ``And`` (shared), or a sequence with one
    entry per query (None = that query is not filtered).
    """

    def __init__(self, attributes: Attributes, predicates):
        if not isinstance(attributes, Attributes):
            raise TypeError(f"attributes must be an Attributes table; got {type(attributes).__name__}")
        self.attributes = attributes
        self.shared = predicates is None or isinstance(predicates, _Predicate)
        rows = [predicates] if self.shared else list(predicates)
        if not rows:
            raise ValueError("predicates is an empty sequence; pass one predicate per query, or one shared predicate")
        for p in rows:
            if p is not None and not isinstance(p, _Predicate):
                raise TypeError(f"predicates must be Eq / Range / And (or None); got {type(p).__name__}")
        names: list[str] = []
        bounds = []
        for p in rows:
            terms = [_bounds(attributes, t) for t in (_terms(p) if p is not None else ())]
            bounds.append(terms)
            names += [t[0] for t in terms if t[0] not in names]
        self.names = tuple(names) if names else (attributes.names[0],)
        lo = np.full((len(rows), len(self.names)), -np.inf, np.float32)
        hi = np.full((len(rows), len(self.names)), np.inf, np.float32)
        for i, terms in enumerate(bounds):
            for name, t_lo, t_hi in terms:
                a = self.names.index(name)
                lo[i, a] = max(lo[i, a], t_lo)
                hi[i, a] = min(hi[i, a], t_hi)
        self.lo_qa, self.hi_qa = lo, hi

    @classmethod
    def from_bounds(cls, attributes: Attributes, names: tuple, lo_qa, hi_qa) -> "AttributeFilter":
        """A filter from compiled bounds (closed float32 ranges per query and attribute), as stored on disk."""
        for name in names:
            attributes.check_name(name)
        lo_qa, hi_qa = np.asarray(lo_qa, np.float32), np.asarray(hi_qa, np.float32)
        if lo_qa.shape != hi_qa.shape or lo_qa.ndim != 2 or lo_qa.shape[1] != len(names):
            raise ValueError(f"bounds {lo_qa.shape} / {hi_qa.shape} must both be [Q, A={len(names)}]")
        flt = cls.__new__(cls)
        flt.attributes, flt.shared, flt.names = attributes, lo_qa.shape[0] == 1, tuple(names)
        flt.lo_qa, flt.hi_qa = lo_qa, hi_qa
        return flt

    @property
    def num_queries(self) -> int | None:
        """Queries this filter is for (None when one predicate is shared by all)."""
        return None if self.shared else self.lo_qa.shape[0]

    def row_predicates(self, num_queries: int, num_rows: int) -> RowPredicates:
        """The kernels' form of this filter (checked against the search's sizes)."""
        if self.attributes.num_rows != num_rows:
            raise ValueError(f"the filter's attributes describe {self.attributes.num_rows} rows but the corpus has "
                             f"{num_rows}; build Attributes with one value per corpus row")
        if not self.shared and self.lo_qa.shape[0] != num_queries:
            raise ValueError(f"the filter has {self.lo_qa.shape[0]} per-query predicates for {num_queries} queries; "
                             "pass one per query or a single shared predicate")
        attrs = np.stack([self.attributes.values[n] for n in self.names])
        return RowPredicates(attrs, self.lo_qa, self.hi_qa)

    def masks(self) -> np.ndarray:
        """bool [1 or Q, N]: the rows each query's predicate passes (NumPy; for references and FAISS)."""
        attrs = np.stack([self.attributes.values[n] for n in self.names])  # [A, N]
        inside = (self.lo_qa[:, :, None] <= attrs[None]) & (attrs[None] <= self.hi_qa[:, :, None])
        return inside.all(axis=1)
