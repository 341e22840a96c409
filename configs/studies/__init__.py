"""Study configs for ``python -m s2mlp.study`` (see s2mlp/study.py for the format)."""

import ml_collections


def fields(mapping: dict) -> ml_collections.ConfigDict:
    """A dict of dotted config fields (``'model.overrides.shift_pattern'``), kept in the order written."""
    return ml_collections.ConfigDict(mapping, allow_dotted_keys=True, sort_keys=False)
