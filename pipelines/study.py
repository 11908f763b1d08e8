"""Run one study (``mfcon study``) as a pipeline file, for ``ray job submit``:

    ray job submit --working-dir . -- python pipelines/study.py \\
        --space search_spaces/mfcon.yaml --data /shared/vox1-shards --workdir /shared/runs --address auto
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "platform"))

from mfcon.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["study", *sys.argv[1:]]))
