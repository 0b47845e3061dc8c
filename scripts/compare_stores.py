"""Whether two scaffold stores hold byte-identical scenes (e.g. one single-worker and one multi-worker
`snd precompute` of the same data). Prints a JSON verdict; exit 1 when they differ.

    python scripts/compare_stores.py STORE_A STORE_B
"""
from __future__ import annotations

import json
import sys

from snd.cache.manifest import scene_digests


def main(a: str, b: str) -> int:
    da, db = scene_digests(a), scene_digests(b)
    differ = sorted(n for n in set(da) & set(db) if da[n] != db[n])
    files = sum(len(v) for v in da.values())
    same = not differ and set(da) == set(db)
    print(json.dumps({"identical": same, "scenes": len(da), "files": files, "only_in_a": sorted(set(da) - set(db)),
                      "only_in_b": sorted(set(db) - set(da)), "differing_scenes": differ,
                      "differing_files": {n: sorted(k for k in set(da[n]) | set(db[n]) if da[n].get(k) != db[n].get(k))[:10]
                                          for n in differ}}, indent=1))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
