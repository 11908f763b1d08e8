"""Exit 0 when this interpreter has exactly the versions pinned in a lock file (``name==version`` lines).

    python cluster/lock_check.py requirements.lock

setup_node.sh asks it of an existing environment before reusing it instead of installing the lock.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata


def pins(lock_text: str) -> dict[str, str]:
    found = {}
    for line in lock_text.splitlines():
        m = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;\\]+)", line)
        if m:
            found[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(3)
    return found


def mismatches(lock_text: str) -> list[str]:
    out = []
    for name, version in sorted(pins(lock_text).items()):
        try:
            have = metadata.version(name)
        except metadata.PackageNotFoundError:
            have = None
        if have != version:
            out.append(f"{name}: locked {version}, found {have}")
    return out


if __name__ == "__main__":
    bad = mismatches(open(sys.argv[1]).read())
    for line in bad[:20]:
        print(line, file=sys.stderr)
    sys.exit(1 if bad else 0)
