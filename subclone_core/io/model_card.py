"""The README.md model card written into every child folder."""

from __future__ import annotations

from subclone_core.core.shape import ROLES
from subclone_core.tasks import task_spec


def model_card(manifest: dict, task: str) -> str:
    """A short Markdown card: where the weights came from, the shapes, and how to load the folder.

    Args:
        manifest: the child's subclone.json content.
        task: the model's task name (subclone_core.tasks), which names the auto class that loads it.
    """
    parent, child = manifest["parent"], manifest["child"]
    rows = "\n".join(
        f"| {role} | {parent['shape'][role]} | {child['shape'][role]} |" for role in ROLES
    )
    loader = task_spec(task).model_class
    calib = manifest.get("calibration") or {}
    origin = (
        f"initialized from `{parent.get('id', 'a parent model')}` by weight subcloning "
        f"(strategy `{manifest['strategy']}`)"
        if manifest["strategy"] != "random"
        else "randomly initialized with the shape of a subcloned child"
    )
    return f"""---
library_name: transformers
tags: [subclone, weight-subcloning]
---
# {parent.get('label') or parent.get('id', 'child')} child: {child['shape']['layers']} blocks x {child['shape']['hidden']}

This model was {origin}. See "Weight subcloning: direct initialization of transformers using larger
pretrained ones" (arXiv:2312.09299). It is an initialization meant for further training.

| size | parent | child |
|---|---|---|
{rows}

- Removed blocks: {manifest.get('removed_blocks') or 'none'}
- Weight scaling by sqrt(fan-in ratio): {'on' if manifest.get('scale') else 'off'}
- Residual ranking: {manifest.get('residual_score') or '-'}; least-squares refit: {'on' if manifest.get('refit') else 'off'}
- Calibration: {calib.get('tokens', 0)} tokens of `{calib.get('data', '-')}`
- Parent weights sha256: `{parent.get('weights_sha256', 'unknown')}`
{_training_line(manifest.get('training'))}
{_licence_line(parent.get('licence'))}`subclone.json` records the kept residual dimensions, heads and FFN neurons of every block.

```python
from transformers import {loader}
model = {loader}.from_pretrained("path/to/this/folder")
```
"""


def _licence_line(licence: dict | None) -> str:
    """The parent's licence, which a derived model comes under too ("" when unknown)."""
    if not licence:
        return ""
    return f"\nLicence: [{licence['name']}]({licence['url']}). {licence.get('notice', '')}\n\n"


def _training_line(training: dict | None) -> str:
    """One line on the training a saved candidate received, or nothing for a freshly made child."""
    if not training:
        return ""
    return f"- Trained after initialization: {training.get('steps_done', '?')} steps (see `subclone.json`)\n"
