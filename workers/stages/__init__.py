"""The cycle's stages, one module each: model and DB side effects around the pure logic in ``policies``.

Which stages exist, in what order and on which queue is declared once, in ``daemon.stage_specs``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from daemon.stage_specs import STAGE_ORDER, stage_function

if TYPE_CHECKING:
    from daemon.stage_runs import StageFn


def load_stages() -> dict[str, StageFn]:
    """Every stage's function by name (imports the model-holding code)."""
    return {name: stage_function(name) for name in STAGE_ORDER}
