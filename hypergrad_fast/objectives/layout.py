"""The flat parameter vector and its named blocks.

Parameters live in one flat float64 vector; :class:`ParamLayout` maps it to named
blocks and gives each block a *group* index, so per-group hyperparameters (one
learning rate, initial scale or L2 strength per weight matrix or bias) expand to
per-parameter arrays with :meth:`ParamLayout.expand`.  Blocks are contiguous, in
the order given, which the compiled objectives and the group sums rely on.
"""

from __future__ import annotations

import numbers
from typing import Mapping, Sequence

import autograd.numpy as anp
import numpy as np

__all__ = ["ParamLayout"]


class ParamLayout:
    """Map a flat parameter vector to named blocks of given shapes.

    Built from an ordered sequence of ``(name, shape)`` pairs.  Attributes:
    ``size`` (total number of parameters), ``names``, ``shapes``, ``slices``
    (name -> slice of the flat vector), ``n_groups`` (number of blocks) and
    ``groups`` (int64 (size,): the block index of every parameter).
    """

    def __init__(self, blocks: Sequence[tuple[str, Sequence[int]]]):
        names, shapes, slices = [], [], {}
        start = 0
        for name, shape in blocks:
            if not isinstance(name, str):
                raise ValueError(f"block names must be strings, got {name!r}")
            if name in slices:
                raise ValueError(f"duplicate block name {name!r}")
            # Accept a bare int for 1-D blocks as NumPy does.
            if isinstance(shape, numbers.Integral):
                shape = (int(shape),)
            else:
                shape = tuple(int(d) for d in shape)
            if any(d < 0 for d in shape):
                raise ValueError(f"block {name!r} has a negative dimension: {shape}")
            n = int(np.prod(shape, dtype=np.int64))
            names.append(name)
            shapes.append(shape)
            slices[name] = slice(start, start + n)
            start += n
        if not names:
            raise ValueError("ParamLayout needs at least one block")
        self.names: tuple[str, ...] = tuple(names)
        self.shapes: tuple[tuple[int, ...], ...] = tuple(shapes)
        self.slices: dict[str, slice] = slices
        self.size: int = start
        self.n_groups: int = len(names)
        sizes = [slices[n].stop - slices[n].start for n in names]
        self.groups: np.ndarray = np.repeat(np.arange(self.n_groups, dtype=np.int64), sizes)
        self.groups.flags.writeable = False  # shared by every expand() call
        self._bounds = [slices[name].stop for name in names[:-1]]

    def _check_flat(self, x) -> None:
        if anp.shape(x) != (self.size,):
            raise ValueError(f"expected a flat vector of shape ({self.size},), got {anp.shape(x)}")

    def unflatten(self, x) -> dict:
        """Flat (size,) vector -> dict name -> block of its shape (views; works on ArrayBoxes)."""
        self._check_flat(x)
        # One split rather than a slice per block: autograd's gradient of a slice is an
        # np.add.at into a zero vector, block after block; split's is one concatenate.
        pieces = anp.split(x, self._bounds)
        return {name: anp.reshape(piece, shape)
                for name, piece, shape in zip(self.names, pieces, self.shapes)}

    def flatten(self, blocks: Mapping[str, object]) -> np.ndarray:
        """Dict name -> array -> flat float64 (size,) vector, checking names and shapes."""
        if set(blocks) != set(self.names):
            missing = sorted(set(self.names) - set(blocks))
            extra = sorted(set(blocks) - set(self.names))
            raise ValueError(
                f"block names do not match the layout: missing {missing}, unexpected {extra}"
            )
        out = np.empty(self.size, dtype=np.float64)
        for name, shape in zip(self.names, self.shapes):
            block = np.asarray(blocks[name], dtype=np.float64)
            if block.shape != shape:
                raise ValueError(f"block {name!r} has shape {block.shape}, expected {shape}")
            out[self.slices[name]] = block.ravel()
        return out

    def expand(self, per_group):
        """Per-group values (n_groups,) -> per-parameter values (size,), differentiably."""
        if anp.shape(per_group) != (self.n_groups,):
            raise ValueError(
                f"expected one value per group, shape ({self.n_groups},), "
                f"got {anp.shape(per_group)}"
            )
        return per_group[self.groups]

    def group_of(self, name: str) -> int:
        """The group (block) index of block ``name``."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no block named {name!r}; blocks are {list(self.names)}") from None

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        blocks = ", ".join(f"{n}{s}" for n, s in zip(self.names, self.shapes))
        return f"ParamLayout(size={self.size}, blocks=[{blocks}])"


def block_offsets(layout: ParamLayout, n_layers: int):
    """(w_off, b_off): int64 (L,) flat offsets of the blocks ``W_l`` and ``b_l``."""
    w_off = np.array([layout.slices[f"W{i}"].start for i in range(n_layers)], dtype=np.int64)
    b_off = np.array([layout.slices[f"b{i}"].start for i in range(n_layers)], dtype=np.int64)
    return w_off, b_off


def group_bounds(layout: ParamLayout) -> np.ndarray:
    """int64 (G+1,): the start of each group's block, then the size."""
    return np.array([layout.slices[n].start for n in layout.names] + [layout.size],
                    dtype=np.int64)
