"""What made a comparison, and its files: the library versions, the record's digest, and the JSON records that
are written once and afterwards only compared (a different one is refused, naming what differs)."""

from __future__ import annotations

import hashlib
import json
import os
import sys


def versions() -> dict:
    import accelerate
    import torch
    import transformers
    import trl

    from ... import __version__ as wmss_version

    return {
        "wmss_trl": wmss_version,
        "trl": trl.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
    }


def digest(record) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _differences(stored: dict, record: dict, prefix: str = "") -> list[str]:
    diff = []
    for key in sorted(set(stored) | set(record)):
        a, b = stored.get(key), record.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += _differences(a, b, f"{prefix}{key}.")
        elif json.dumps(a, default=str) != json.dumps(b, default=str):
            diff.append(f"{prefix}{key}: {a!r} there, {b!r} now")
    return diff


def check_record(path: str, record: dict, what: str) -> None:
    """Write ``record`` to ``path``, or, if ``path`` holds one, refuse a different one (naming what differs)."""
    if os.path.isfile(path):
        diff = _differences(read_json(path), json.loads(json.dumps(record, default=str)))
        if diff:
            raise SystemExit(
                f"wmss compare: {what} in {os.path.dirname(path)} was made with other settings ({'; '.join(diff[:8])}"
                f"{'; ...' if len(diff) > 8 else ''}). Results are never mixed: use another --output_dir, or delete "
                "that folder."
            )
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, record)


def write_json(path: str, data) -> None:
    """``data`` as JSON (indent 1, keys in their order) via ``<path>.tmp`` and ``os.replace``."""
    with open(path + ".tmp", "w") as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(path + ".tmp", path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)
