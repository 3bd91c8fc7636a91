"""Group-aware, stratified, seeded train/val(/test) split.

A *split group* is the unit that may not be divided between splits. Two images share one
when they are pixel-identical (same content hash), when they are near-copies (the same
picture re-encoded, resized, slightly cropped or brightened: ``near_duplicates``), or when
the manifest puts them in the same group (e.g. one HAM10000 lesion), transitively: a lesion
whose photo is duplicated under another lesion pulls both lesions into one group. Splitting
by group instead of by image is what keeps near-copies out of validation and test.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

SPLIT_NAMES = ("train", "val", "test")


class UnionFind:
    """Disjoint sets over rows 0..n-1; a set's id is its smallest row (stable across runs)."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)  # smallest row wins: stable group ids


def split_groups(hashes: Sequence[str], manifest_groups: Sequence[str | None],
                 near_pairs: Iterable[tuple[int, int]] = ()) -> list[int]:
    """Per row, the id of its split group (the smallest row index in the group); ``near_pairs``:
    rows (i, j) that are near-copies of each other (``near_duplicates.find_near_duplicate_pairs``)."""
    uf = UnionFind(len(hashes))
    for i, j in near_pairs:
        uf.union(int(i), int(j))
    first_by_key: dict[tuple[str, str], int] = {}
    for i, (h, g) in enumerate(zip(hashes, manifest_groups, strict=True)):
        for key in (("hash", h), ("group", g)):
            if key[1] is None:
                continue
            j = first_by_key.setdefault(key, i)
            if j != i:
                uf.union(i, j)
    return [uf.find(i) for i in range(len(hashes))]


def fractions_for(val: float, test: float) -> dict[str, float]:
    """Validated split fractions; train gets the remainder."""
    if not (0 <= val < 1 and 0 <= test < 1 and val + test < 1):
        raise ValueError(f"split fractions must satisfy 0 <= val, test and val + test < 1; got val={val}, test={test}")
    fr = {"train": round(1.0 - val - test, 12), "val": val}
    if test > 0:
        fr["test"] = test
    return fr


def assign_splits(group_ids: Sequence[int], labels: Sequence[int], fractions: dict[str, float], seed: int) -> list[str]:
    """Assign whole groups to splits so each class's images follow `fractions`.

    Per class (a group's class is its most common label), groups are shuffled with `seed`
    and each goes to the split furthest below its target image count. Greedy filling by
    image count (not group count) matters for HAM10000, where a lesion has 1 to 6 images.
    Output depends only on the inputs and the seed.
    """
    members: dict[int, list[int]] = defaultdict(list)
    for row, g in enumerate(group_ids):
        members[g].append(row)
    group_label = {g: Counter(labels[r] for r in rows).most_common(1)[0][0] for g, rows in members.items()}
    by_class: dict[int, list[int]] = defaultdict(list)
    for g in sorted(members):
        by_class[group_label[g]].append(g)

    names = list(fractions)
    rng = np.random.default_rng(seed)
    split_of_group: dict[int, str] = {}
    for label in sorted(by_class):
        groups = by_class[label]
        order = rng.permutation(len(groups))
        total = sum(len(members[g]) for g in groups)
        target = np.array([fractions[n] * total for n in names])
        filled = np.zeros(len(names))
        for k in order:
            g = groups[k]
            s = int(np.argmax(target - filled))  # ties go to the earlier split (train first)
            split_of_group[g] = names[s]
            filled[s] += len(members[g])
    return [split_of_group[g] for g in group_ids]
