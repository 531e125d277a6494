#!/usr/bin/env python3
"""Writes a recording with a misleading stretch, for the rollback-guard demonstration.

The shipped target stream (clean, 5 % labels), followed by a stretch of mislabeled feedback:
the first STRETCH samples of the same stream again, every 2nd one labeled with a consistently
wrong class (WALKING->UPSTAIRS->DOWNSTAIRS->WALKING, SITTING<->STANDING, LAYING->SITTING), as
an operator confirming the wrong button for a while would. Standard library only.

    python3 tools/model/make_misleading.py OUT.jsonl [STRETCH]
"""
import json
import sys
from pathlib import Path

WRONG = {0: 1, 1: 2, 2: 0, 3: 4, 4: 3, 5: 3}


def main() -> None:
    out = Path(sys.argv[1])
    stretch = int(sys.argv[2]) if len(sys.argv) > 2 else 400
    src = Path(__file__).resolve().parents[2] / "data" / "target_stream.jsonl"
    lines = [json.loads(l) for l in src.read_text().splitlines() if l.strip()]
    rows = list(lines)
    for i, s in enumerate(lines[:stretch]):
        s = dict(s)
        s.pop("label", None)
        if i % 2 == 0:
            s["label"] = WRONG[s["truth"]]
        rows.append(s)
    out.write_text("".join(json.dumps(r, separators=(",", ":")) + "\n" for r in rows))


if __name__ == "__main__":
    main()
