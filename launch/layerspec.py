"""Dry-run a layer spec: shapes per item, the first item that does not fit, the latent shape.

    python launch/layerspec.py launch/configs/specs/basic.json --image-size 256   # encoder + decoder
    python launch/layerspec.py '["C2d_3_64_3_1_1", "2*VAERB_64_64"]' --image-size 64    # one side
    python launch/layerspec.py SPEC --image-size 64 --norm-groups 8                # as model.norm_groups=8 trains
    python launch/layerspec.py --tokens                                           # every layer name

Exit codes: 0 the spec fits, 1 it does not (one line naming the item), 2 a usage mistake (one line:
malformed inline JSON, a size or group count under 1).
The same as `python -m models.layerspec`, without runpy's warning about a module the `models`
package has already imported.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.layerspec import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python launch/layerspec.py"))
