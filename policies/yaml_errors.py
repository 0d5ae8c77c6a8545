"""One wording for YAML syntax errors, wherever a user-edited YAML file is read."""

from __future__ import annotations

import yaml


def describe_yaml_error(exc: yaml.YAMLError) -> str:
    """``" at line L, column C: problem"`` (1-based), or ``": message"`` without a position."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{where}: {getattr(exc, 'problem', None) or exc}"
