"""TensorFlow's feature columns in torch: the same bucket ids and the same dense features.

Follows tf.feature_column (tensorflow/python/feature_column/feature_column_v2.py) and the ops it
calls, so a pipeline written for TensorFlow gives the same ids here:

    numeric(key, shape, normalizer_fn)     x -> normalizer_fn(x), reshaped to (batch, prod(shape))
    bucketized(source, boundaries)         bucket(x) = #{i : boundaries[i] <= x}, so bucket i holds
                                           boundaries[i-1] <= x < boundaries[i] (TF's Bucketize,
                                           compared in float32); the j-th element of a numeric of
                                           d elements gets id bucket + j (len(boundaries) + 1)
    categorical_with_hash_bucket(key, n)   Fingerprint64(s) mod n (StringToHashBucketFast); an int
                                           is hashed as its decimal string, as TF's as_string
    categorical_with_vocabulary(key, ...)  the index of s in the vocabulary (a list, or a file of
                                           one entry a line); out of vocabulary: default_value, or
                                           V + Fingerprint64(s) mod num_oov_buckets
    categorical_with_identity(key, n)      the int itself, in [0, n); default_value otherwise
    crossed(keys, n, hash_key)             for each element of the cartesian product of a row's
                                           leaf values (the last leaf varying fastest):
                                           h = hash_key;  h = FingerprintCat64(h, f_i) per leaf;
                                           id = h mod n, where f_i is Fingerprint64 of a string, the
                                           64-bit pattern of an int or of a categorical column's id
                                           (TF's SparseCross kernel with hashed output)
    weighted_categorical(col, weight_key)  col's ids with one weight per id
    indicator(col)                         multi-hot: row b, column i = sum of the weights (1 when
                                           unweighted) of the ids equal to i; ids outside [0, n)
                                           (TF's default -1) add nothing
    embedding(col, d, combiner)            a bag of ids e_i with weights w_i > 0 (ids < 0 and
                                           weights <= 0 dropped, as safe_embedding_lookup_sparse):
                                           sum: sum w_i e_i;  mean: / sum w_i;  sqrtn: / sqrt(sum
                                           w_i^2); an empty bag gives zeros
    DenseFeatures(columns)                 the dense columns sorted by name, concatenated

Inputs are a dict from key to a batch: a list, NumPy array or tensor of one value per example
((batch,) or (batch, k): TF's dense input), or a list of lists (a variable number of values per
example: TF's sparse input). Dense categorical inputs drop TF's missing-value markers, '' for
strings and -1 for ints; lists of lists are taken as given. In a cross, TF's kernel takes its
sparse inputs before its dense ones, so a raw key fed densely comes after the categorical
columns and the sparse keys in the hash chain; this module keeps that order so the ids agree.

The ids are computed over the whole batch with NumPy and torch; strings are hashed by
:mod:`mlatlas.data.formats.farmhash` and looked up in a dict (one step per string).
Not implemented: sequence columns, shared embeddings, embedding max_norm, checkpoint loading.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mlatlas.data.formats.farmhash import fingerprint64, fingerprint_cat64, to_bytes

DEFAULT_HASH_KEY = 0xDECAFCAFFE
Features = dict[str, Any]


class FeatureColumnError(ValueError):
    """A feature column built with bad arguments or given bad inputs (one line: column, key)."""


@dataclass(frozen=True)
class SparseIds:
    """A batch of bags of ids: row b holds ``ids[splits[b]:splits[b + 1]]`` (int64), with
    ``weights`` of the same length (float32) or None for weight 1."""

    ids: torch.Tensor
    splits: torch.Tensor
    weights: torch.Tensor | None = None

    @property
    def batch_size(self) -> int:
        return len(self.splits) - 1

    def rows(self) -> torch.Tensor:
        """The row of each id: (nnz,) int64."""
        return torch.from_numpy(np.repeat(np.arange(self.batch_size), np.diff(self.splits.numpy())))


# ---------------------------------------------------------------------------------------------
# Raw inputs: one flat array of values, row splits, and whether TF would see a dense tensor.

@dataclass(frozen=True)
class _Raw:
    values: np.ndarray  # an object array of bytes, int64 or float32
    splits: np.ndarray
    dense: bool


def _feature(features: Features, key: str) -> Any:
    if key not in features:
        raise FeatureColumnError(f"feature {key!r} is missing from the inputs "
                                 f"(given: {sorted(features)})")
    return features[key]


def _is_string(x: Any) -> bool:
    return isinstance(x, str | bytes)  # NumPy's str_ and bytes_ are subclasses


def _flatten(value: Any, key: str) -> tuple[Any, np.ndarray, bool]:
    """A batch as (flat values, row splits, dense): one row per example."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim not in (1, 2):
            raise FeatureColumnError(f"feature {key!r}: expected (batch,) or (batch, k) values, "
                                     f"got shape {value.shape}")
        width = 1 if value.ndim == 1 else value.shape[1]
        flat = list(value.reshape(-1)) if value.dtype.kind in "USO" else value.reshape(-1)
        return flat, np.arange(len(value) + 1, dtype=np.int64) * width, True
    if not isinstance(value, list | tuple):
        raise FeatureColumnError(f"feature {key!r}: expected a list, array or tensor, "
                                 f"got {type(value).__name__}")
    if not any(issubclass(t, list | tuple | np.ndarray) for t in set(map(type, value))):
        return list(value), np.arange(len(value) + 1, dtype=np.int64), True
    rows = [r if isinstance(r, list | tuple | np.ndarray) else [r] for r in value]
    splits = np.concatenate([[0], np.cumsum(list(map(len, rows)))]).astype(np.int64)
    return list(chain.from_iterable(rows)), splits, False


def _typed(flat: Any, key: str, dtype: Literal["string", "int64", "float32"] | None):
    """The values as an object array of bytes, or int64 / float32; None takes strings or ints."""
    if dtype == "string" or (dtype is None and len(flat) > 0 and _is_string(flat[0])):
        if not all(issubclass(t, str | bytes) for t in set(map(type, flat))):
            raise FeatureColumnError(f"feature {key!r}: expected strings for a string column")
        values = np.empty(len(flat), dtype=object)
        values[:] = to_bytes(flat)
        return values
    values = np.asarray(flat)
    if len(flat) and values.dtype.kind not in ("iuf" if dtype == "float32" else "iu"):
        expected = "numbers" if dtype == "float32" else "integers"
        raise FeatureColumnError(f"feature {key!r}: expected {expected}, got {values.dtype}")
    return values.astype(np.float32 if dtype == "float32" else np.int64)


def _read_raw(features: Features, key: str, dtype: Literal["string", "int64", "float32"] | None,
              drop_missing: bool) -> _Raw:
    """The batch under ``key`` flattened; ``drop_missing`` drops '' and -1 from dense inputs,
    as TF's categorical columns do (its crosses and weights keep them)."""
    flat, splits, dense = _flatten(_feature(features, key), key)
    values = _typed(flat, key, dtype)
    if drop_missing and dense:
        missing = values == (b"" if values.dtype == object else -1)
        if missing.any():
            rows = np.repeat(np.arange(len(splits) - 1), np.diff(splits))
            kept = np.bincount(rows[~missing], minlength=len(splits) - 1)
            values = values[~missing]
            splits = np.concatenate([[0], np.cumsum(kept)]).astype(np.int64)
    return _Raw(values, splits, dense)


def _sparse(ids: np.ndarray, splits: np.ndarray) -> SparseIds:
    return SparseIds(torch.from_numpy(np.asarray(ids, dtype=np.int64)),
                     torch.from_numpy(np.asarray(splits, dtype=np.int64)))


def to_hash_bucket_fast(values: Sequence[str | bytes], num_buckets: int) -> np.ndarray:
    """TF's StringToHashBucketFast: Fingerprint64(s) mod num_buckets, (n,) int64."""
    if num_buckets < 1:
        raise FeatureColumnError(f"num_buckets must be at least 1, got {num_buckets}")
    return (fingerprint64(values) % np.uint64(num_buckets)).astype(np.int64)


def _decimal(values: np.ndarray) -> list[bytes]:
    """Ints as TF's as_string writes them: b'-5', b'101'."""
    return values.astype("S").tolist()


# ---------------------------------------------------------------------------------------------
# Columns.

class CategoricalColumn(ABC):
    """A column whose output is a bag of ids in [0, num_buckets) per example; ``name`` and
    ``num_buckets`` are fields or properties of each kind."""

    name: str
    num_buckets: int

    @abstractmethod
    def sparse_ids(self, features: Features) -> SparseIds: ...


class DenseColumn(ABC):
    """A column whose output is a (batch, dimension) float tensor."""

    name: str
    dimension: int

    @abstractmethod
    def dense(self, features: Features, weight: torch.Tensor | None = None) -> torch.Tensor: ...


@dataclass(frozen=True)
class NumericColumn(DenseColumn):
    key: str
    shape: tuple[int, ...] = (1,)
    normalizer_fn: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def name(self) -> str:
        return self.key

    @property
    def dimension(self) -> int:
        return math.prod(self.shape)

    def values(self, features: Features) -> torch.Tensor:
        """(batch, *shape) float32, normalised."""
        raw = _feature(features, self.key)
        try:
            x = raw.float() if isinstance(raw, torch.Tensor) else torch.from_numpy(
                np.asarray(raw, dtype=np.float32))
        except (TypeError, ValueError) as e:
            raise FeatureColumnError(f"feature {self.key!r}: not a numeric batch ({e})") from None
        if x.ndim == 0 or x.numel() != len(x) * self.dimension:
            raise FeatureColumnError(f"feature {self.key!r}: expected (batch, {self.shape}) "
                                     f"values, got shape {tuple(x.shape)}")
        x = x.reshape(len(x), *self.shape)
        return self.normalizer_fn(x) if self.normalizer_fn is not None else x

    def dense(self, features: Features, weight: torch.Tensor | None = None) -> torch.Tensor:
        x = self.values(features)
        return x.reshape(len(x), -1)


@dataclass(frozen=True)
class BucketizedColumn(DenseColumn, CategoricalColumn):
    source: NumericColumn
    boundaries: tuple[float, ...]

    @property
    def name(self) -> str:
        return f"{self.source.name}_bucketized"

    @property
    def num_buckets(self) -> int:
        return (len(self.boundaries) + 1) * self.source.dimension

    @property
    def dimension(self) -> int:
        return self.num_buckets

    def buckets(self, features: Features) -> torch.Tensor:
        """(batch, source dimension) int64 bucket of each element."""
        x = self.source.values(features).reshape(-1, self.source.dimension)
        # TF stores boundaries as a list of float32 and compares float32 values to them.
        edges = torch.tensor(self.boundaries, dtype=torch.float32)
        return torch.bucketize(x.float(), edges, right=True)

    def sparse_ids(self, features: Features) -> SparseIds:
        b = self.buckets(features)
        ids = b + torch.arange(b.shape[1]) * (len(self.boundaries) + 1)
        splits = torch.arange(0, b.numel() + 1, max(b.shape[1], 1))
        return SparseIds(ids.reshape(-1), splits)

    def dense(self, features: Features, weight: torch.Tensor | None = None) -> torch.Tensor:
        b = self.buckets(features)
        return F.one_hot(b, len(self.boundaries) + 1).reshape(len(b), -1).float()


@dataclass(frozen=True)
class HashedColumn(CategoricalColumn):
    key: str
    hash_bucket_size: int
    dtype: Literal["string", "int64"] = "string"

    @property
    def name(self) -> str:
        return self.key

    @property
    def num_buckets(self) -> int:
        return self.hash_bucket_size

    def sparse_ids(self, features: Features) -> SparseIds:
        raw = _read_raw(features, self.key, self.dtype, drop_missing=True)
        values = raw.values if self.dtype == "string" else _decimal(raw.values)
        return _sparse(to_hash_bucket_fast(values, self.hash_bucket_size), raw.splits)


@dataclass(frozen=True)
class VocabularyColumn(CategoricalColumn):
    key: str
    vocabulary: tuple  # bytes for a string column, int for an integer one
    dtype: Literal["string", "int64"]
    num_oov_buckets: int = 0
    default_value: int = -1
    _table: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "_table", {v: i for i, v in enumerate(self.vocabulary)})

    @property
    def name(self) -> str:
        return self.key

    @property
    def num_buckets(self) -> int:
        return len(self.vocabulary) + self.num_oov_buckets

    def sparse_ids(self, features: Features) -> SparseIds:
        raw = _read_raw(features, self.key, self.dtype, drop_missing=True)
        get = self._table.get
        ids = np.array([get(v, -1) for v in raw.values.tolist()], dtype=np.int64)
        oov = ids < 0
        if self.num_oov_buckets and oov.any():
            missing = raw.values[oov]
            text = list(missing) if self.dtype == "string" else _decimal(missing)
            ids[oov] = len(self.vocabulary) + to_hash_bucket_fast(text, self.num_oov_buckets)
        else:
            ids[oov] = self.default_value
        return _sparse(ids, raw.splits)


@dataclass(frozen=True)
class IdentityColumn(CategoricalColumn):
    key: str
    num_buckets: int
    default_value: int | None = None

    @property
    def name(self) -> str:
        return self.key

    def sparse_ids(self, features: Features) -> SparseIds:
        raw = _read_raw(features, self.key, "int64", drop_missing=True)
        ids = raw.values.copy()
        bad = (ids < 0) | (ids >= self.num_buckets)
        if bad.any():
            if self.default_value is None:
                raise FeatureColumnError(
                    f"feature {self.key!r}: ids must be in [0, {self.num_buckets}) without "
                    f"a default_value, got {ids[bad][:5].tolist()}")
            ids[bad] = self.default_value
        return _sparse(ids, raw.splits)


@dataclass(frozen=True)
class WeightedCategoricalColumn(CategoricalColumn):
    categorical: CategoricalColumn
    weight_feature_key: str

    @property
    def name(self) -> str:
        return f"{self.categorical.name}_weighted_by_{self.weight_feature_key}"

    @property
    def num_buckets(self) -> int:
        return self.categorical.num_buckets

    def sparse_ids(self, features: Features) -> SparseIds:
        base = self.categorical.sparse_ids(features)
        raw = _read_raw(features, self.weight_feature_key, "float32", drop_missing=False)
        if not np.array_equal(raw.splits, base.splits.numpy()):
            raise FeatureColumnError(
                f"feature {self.weight_feature_key!r}: one weight per id of "
                f"{self.categorical.name!r} expected, got row lengths "
                f"{np.diff(raw.splits)[:5].tolist()} against "
                f"{torch.diff(base.splits)[:5].tolist()}")
        weights = torch.from_numpy(raw.values)
        return SparseIds(base.ids, base.splits, weights)


@dataclass(frozen=True)
class CrossedColumn(CategoricalColumn):
    keys: tuple  # raw feature keys (str) and categorical columns, crossed columns flattened
    hash_bucket_size: int
    hash_key: int = DEFAULT_HASH_KEY

    @property
    def leaves(self) -> list:
        out = []
        for key in self.keys:
            out.extend(key.leaves if isinstance(key, CrossedColumn) else [key])
        return out

    @property
    def name(self) -> str:
        return "_X_".join(sorted(k if isinstance(k, str) else k.name for k in self.leaves))

    @property
    def num_buckets(self) -> int:
        return self.hash_bucket_size

    def sparse_ids(self, features: Features) -> SparseIds:
        sparse, dense = [], []
        for leaf in self.leaves:
            if isinstance(leaf, str):
                raw = _read_raw(features, leaf, None, drop_missing=False)
                (dense if raw.dense else sparse).append(_leaf_fingerprints(raw))
            else:
                ids = leaf.sparse_ids(features)
                sparse.append((ids.ids.numpy().view(np.uint64), ids.splits.numpy()))
        return _cross(sparse + dense, self.hash_bucket_size, self.hash_key, self.name)


def _leaf_fingerprints(raw: _Raw) -> tuple[np.ndarray, np.ndarray]:
    """A cross's word per value: Fingerprint64 of a string, the bit pattern of an int."""
    if raw.values.dtype == object:
        return fingerprint64(raw.values), raw.splits
    return raw.values.view(np.uint64), raw.splits


def _cross(leaves: list[tuple[np.ndarray, np.ndarray]], num_buckets: int, hash_key: int,
           name: str) -> SparseIds:
    batch = {len(splits) - 1 for _, splits in leaves}
    if len(batch) != 1:
        raise FeatureColumnError(f"crossed {name!r}: inputs have different batch sizes {batch}")
    (b,) = batch
    h = np.full(b, hash_key, dtype=np.uint64)
    h_splits = np.arange(b + 1, dtype=np.int64)
    for words, splits in leaves:
        count_h, count_w = np.diff(h_splits), np.diff(splits)
        count = count_h * count_w
        out_splits = np.concatenate([[0], np.cumsum(count)]).astype(np.int64)
        row = np.repeat(np.arange(b), count)
        k = np.arange(out_splits[-1]) - out_splits[:-1][row]  # position in the row's product
        left = h_splits[:-1][row] + k // count_w[row]
        right = splits[:-1][row] + k % count_w[row]
        h, h_splits = fingerprint_cat64(h[left], words[right]), out_splits
    # TF's kernel: mod num_buckets, or mod the largest int64 to stay non-negative.
    modulus = np.uint64(num_buckets if num_buckets > 0 else 2**63 - 1)
    return _sparse((h % modulus).astype(np.int64), h_splits)


def cross_hashed(inputs: Sequence[Any], num_buckets: int = 0,
                 hash_key: int = DEFAULT_HASH_KEY) -> SparseIds:
    """TF's tf.sparse.cross_hashed: each input is a batch as ``features`` values take it (a list
    of lists is TF's sparse input, a 2-D array or tensor its dense one; dense inputs go after
    the sparse ones). Returns the hashed crosses, row by row."""
    raws = [_read_raw({"input": x}, "input", None, drop_missing=False) for x in inputs]
    ordered = [r for r in raws if not r.dense] + [r for r in raws if r.dense]
    return _cross([_leaf_fingerprints(r) for r in ordered], num_buckets, hash_key, "inputs")


@dataclass(frozen=True)
class IndicatorColumn(DenseColumn):
    categorical: CategoricalColumn

    @property
    def name(self) -> str:
        return f"{self.categorical.name}_indicator"

    @property
    def dimension(self) -> int:
        return self.categorical.num_buckets

    def dense(self, features: Features, weight: torch.Tensor | None = None) -> torch.Tensor:
        return multi_hot(self.categorical.sparse_ids(features), self.dimension)


def multi_hot(bags: SparseIds, num_buckets: int) -> torch.Tensor:
    """(batch, num_buckets): the summed weights of each id (ids outside [0, n) add nothing)."""
    out = torch.zeros(bags.batch_size, num_buckets)
    keep = (bags.ids >= 0) & (bags.ids < num_buckets)
    w = torch.ones(len(bags.ids)) if bags.weights is None else bags.weights
    out.index_put_((bags.rows()[keep], bags.ids[keep]), w[keep], accumulate=True)
    return out


@dataclass(frozen=True)
class EmbeddingColumn(DenseColumn):
    categorical: CategoricalColumn
    dimension: int
    combiner: Literal["mean", "sqrtn", "sum"] = "mean"

    @property
    def name(self) -> str:
        return f"{self.categorical.name}_embedding"

    def initial_weight(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """TF's default: a normal of std 1/sqrt(dimension) truncated at two standard deviations."""
        std = 1.0 / math.sqrt(self.dimension)
        w = torch.empty(self.categorical.num_buckets, self.dimension)
        return nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std, generator=generator)

    def dense(self, features: Features, weight: torch.Tensor | None = None) -> torch.Tensor:
        if weight is None:
            raise FeatureColumnError(f"embedding {self.name!r} needs its weight table")
        return embedding_bag(weight, self.categorical.sparse_ids(features), self.combiner)


def embedding_bag(weight: torch.Tensor, bags: SparseIds,
                  combiner: Literal["mean", "sqrtn", "sum"]) -> torch.Tensor:
    """(batch, d): each bag's combined rows of ``weight`` (num_buckets, d), as TF's
    safe_embedding_lookup_sparse (ids < 0 and weights <= 0 dropped, empty bags zero)."""
    w = torch.ones(len(bags.ids)) if bags.weights is None else bags.weights
    keep = (bags.ids >= 0) & (w > 0)
    rows, ids, w = bags.rows()[keep], bags.ids[keep], w[keep].to(weight)
    out = weight.new_zeros(bags.batch_size, weight.shape[1])
    out = out.index_add(0, rows.to(weight.device), weight[ids.to(weight.device)] * w[:, None])
    if combiner == "sum":
        return out
    norm = w if combiner == "mean" else w * w
    total = weight.new_zeros(bags.batch_size).index_add(0, rows.to(weight.device), norm)
    total = total if combiner == "mean" else total.sqrt()
    return out / torch.where(total > 0, total, torch.ones_like(total))[:, None]


# ---------------------------------------------------------------------------------------------
# The constructors, with TF's argument checks.

def numeric(key: str, shape: int | Sequence[int] = (1,),
            normalizer_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> NumericColumn:
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not shape or any(d < 1 for d in shape):
        raise FeatureColumnError(f"numeric {key!r}: shape must be positive, got {shape}")
    return NumericColumn(key, shape, normalizer_fn)


def bucketized(source: NumericColumn, boundaries: Sequence[float]) -> BucketizedColumn:
    if not isinstance(source, NumericColumn):
        raise FeatureColumnError(f"bucketized: source must be a numeric column, "
                                 f"got {type(source).__name__}")
    b = tuple(float(x) for x in boundaries)
    if not b or not np.all(np.diff(b) > 0):
        raise FeatureColumnError(f"bucketized {source.name!r}: boundaries must be a non-empty "
                                 f"increasing list, got {list(boundaries)}")
    return BucketizedColumn(source, b)


def categorical_with_hash_bucket(key: str, hash_bucket_size: int,
                                 dtype: Literal["string", "int64"] = "string") -> HashedColumn:
    if hash_bucket_size < 1:
        raise FeatureColumnError(f"hash bucket {key!r}: hash_bucket_size must be at least 1, "
                                 f"got {hash_bucket_size}")
    return HashedColumn(key, hash_bucket_size, _check_dtype(key, dtype))


def _check_dtype(key: str, dtype: str) -> Literal["string", "int64"]:
    if dtype not in ("string", "int64"):
        raise FeatureColumnError(f"column {key!r}: dtype must be 'string' or 'int64', "
                                 f"got {dtype!r}")
    return dtype  # type: ignore[return-value]


def categorical_with_vocabulary(
        key: str, vocabulary_list: Sequence[str | int] | None = None,
        vocabulary_file: str | Path | None = None, vocabulary_size: int | None = None,
        num_oov_buckets: int = 0, default_value: int = -1,
        dtype: Literal["string", "int64"] | None = None) -> VocabularyColumn:
    """From a list, or from a file of one entry a line (its first ``vocabulary_size`` lines);
    ``dtype`` defaults to the list's type, or to 'string' for a file."""
    if (vocabulary_list is None) == (vocabulary_file is None):
        raise FeatureColumnError(f"vocabulary {key!r}: give exactly one of vocabulary_list "
                                 f"and vocabulary_file")
    if num_oov_buckets < 0:
        raise FeatureColumnError(f"vocabulary {key!r}: num_oov_buckets must be non-negative, "
                                 f"got {num_oov_buckets}")
    if num_oov_buckets and default_value != -1:
        raise FeatureColumnError(f"vocabulary {key!r}: give num_oov_buckets or default_value, "
                                 f"not both")
    if vocabulary_file is not None:
        entries = _read_vocabulary_file(key, Path(vocabulary_file), vocabulary_size)
        dtype = _check_dtype(key, dtype or "string")
        if dtype == "int64":
            try:
                entries = [int(e) for e in entries]
            except ValueError as e:
                raise FeatureColumnError(f"vocabulary {key!r}: {vocabulary_file} holds a "
                                         f"non-integer entry for an int64 column ({e})") from None
    else:
        entries = list(vocabulary_list)
        strings = bool(entries) and _is_string(entries[0])
        dtype = _check_dtype(key, dtype or ("string" if strings else "int64"))
    if not entries:
        raise FeatureColumnError(f"vocabulary {key!r}: the vocabulary is empty")
    if not all(_is_string(e) if dtype == "string" else isinstance(e, int | np.integer)
               for e in entries):
        raise FeatureColumnError(f"vocabulary {key!r}: every entry must be a "
                                 f"{'string' if dtype == 'string' else 'integer'} ({dtype})")
    vocabulary = tuple(to_bytes(entries)) if dtype == "string" else tuple(int(e) for e in entries)
    if len(set(vocabulary)) != len(vocabulary):
        raise FeatureColumnError(f"vocabulary {key!r}: duplicate entries in the vocabulary")
    return VocabularyColumn(key, vocabulary, dtype, num_oov_buckets, default_value)


def _read_vocabulary_file(key: str, path: Path, size: int | None) -> list[bytes]:
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as e:
        raise FeatureColumnError(f"vocabulary {key!r}: cannot read {path} ({e.strerror})") \
            from None
    if lines and lines[-1] == b"":
        lines.pop()  # the newline that ends the last line
    if size is not None and size > len(lines):
        raise FeatureColumnError(f"vocabulary {key!r}: vocabulary_size {size} but {path} has "
                                 f"{len(lines)} lines")
    return lines[:size] if size is not None else lines


def categorical_with_identity(key: str, num_buckets: int,
                              default_value: int | None = None) -> IdentityColumn:
    if num_buckets < 1:
        raise FeatureColumnError(f"identity {key!r}: num_buckets must be at least 1, "
                                 f"got {num_buckets}")
    if default_value is not None and not 0 <= default_value < num_buckets:
        raise FeatureColumnError(f"identity {key!r}: default_value {default_value} is not in "
                                 f"[0, {num_buckets})")
    return IdentityColumn(key, num_buckets, default_value)


def crossed(keys: Sequence[str | CategoricalColumn], hash_bucket_size: int,
            hash_key: int = DEFAULT_HASH_KEY) -> CrossedColumn:
    if len(keys) < 2:
        raise FeatureColumnError(f"crossed: keys must hold at least 2 entries, got {len(keys)}")
    if hash_bucket_size < 1:
        raise FeatureColumnError(f"crossed: hash_bucket_size must be at least 1, "
                                 f"got {hash_bucket_size}")
    for key in keys:
        if isinstance(key, HashedColumn):
            raise FeatureColumnError(f"crossed: cross the raw key {key.key!r}, not its hash "
                                     f"bucket column (as TF requires)")
        if isinstance(key, WeightedCategoricalColumn):
            raise FeatureColumnError(f"crossed: {key.name!r} carries weights, which a cross "
                                     f"cannot use")
        if not isinstance(key, str | CategoricalColumn):
            raise FeatureColumnError(f"crossed: keys must be feature names or categorical "
                                     f"columns, got {type(key).__name__}")
    return CrossedColumn(tuple(keys), hash_bucket_size, hash_key)


def weighted_categorical(categorical: CategoricalColumn,
                         weight_feature_key: str) -> WeightedCategoricalColumn:
    _check_categorical("weighted_categorical", categorical)
    return WeightedCategoricalColumn(categorical, weight_feature_key)


def indicator(categorical: CategoricalColumn) -> IndicatorColumn:
    _check_categorical("indicator", categorical)
    return IndicatorColumn(categorical)


def embedding(categorical: CategoricalColumn, dimension: int,
              combiner: Literal["mean", "sqrtn", "sum"] = "mean") -> EmbeddingColumn:
    _check_categorical("embedding", categorical)
    if dimension < 1:
        raise FeatureColumnError(f"embedding {categorical.name!r}: dimension must be at least "
                                 f"1, got {dimension}")
    if combiner not in ("mean", "sqrtn", "sum"):
        raise FeatureColumnError(f"embedding {categorical.name!r}: combiner must be 'mean', "
                                 f"'sqrtn' or 'sum', got {combiner!r}")
    return EmbeddingColumn(categorical, dimension, combiner)


def _check_categorical(what: str, column: Any) -> None:
    if not isinstance(column, CategoricalColumn):
        raise FeatureColumnError(f"{what}: expected a categorical column, "
                                 f"got {type(column).__name__}")


class DenseFeatures(nn.Module):
    """The dense columns' outputs, sorted by column name and concatenated: (batch, dimension).

    Embedding tables are parameters, ``embeddings[column.name]`` (num_buckets, d)."""

    def __init__(self, columns: Sequence[DenseColumn], generator: torch.Generator | None = None):
        super().__init__()
        if not columns:
            raise FeatureColumnError("DenseFeatures: no columns given")
        for c in columns:
            if not isinstance(c, DenseColumn):
                raise FeatureColumnError(f"DenseFeatures: {getattr(c, 'name', c)!r} is not a "
                                         f"dense column; wrap categorical columns in "
                                         f"indicator or embedding")
        names = [c.name for c in columns]
        if len(set(names)) != len(names):
            raise FeatureColumnError(f"DenseFeatures: duplicate column names in {names}")
        self.columns = sorted(columns, key=lambda c: c.name)
        self.embeddings = nn.ParameterDict({
            c.name: nn.Parameter(c.initial_weight(generator))
            for c in self.columns if isinstance(c, EmbeddingColumn)})

    @property
    def dimension(self) -> int:
        return sum(c.dimension for c in self.columns)

    def forward(self, features: Features) -> torch.Tensor:
        parts = []
        for c in self.columns:
            weight = self.embeddings[c.name] if isinstance(c, EmbeddingColumn) else None
            parts.append(c.dense(features, weight))
        device = next((p.device for p in self.parameters()), torch.device("cpu"))
        return torch.cat([p.to(device) for p in parts], dim=1)
