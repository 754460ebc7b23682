"""The README.md model card written into every child folder."""

from __future__ import annotations

from subclone_core.core.manifest import Manifest, TrainingInfo
from subclone_core.core.shape import ROLES
from subclone_core.tasks import task_spec


def model_card(manifest: Manifest, task: str) -> str:
    """A short Markdown card: where the weights came from, the shapes, and how to load the folder.

    Args:
        manifest: the child's subclone.json record.
        task: the model's task name (subclone_core.tasks), which names the auto class that loads it.
    """
    parent, child_shape = manifest.parent, manifest.child_shape
    rows = "\n".join(f"| {role} | {parent.shape[role]} | {child_shape[role]} |" for role in ROLES)
    loader = task_spec(task).model_class
    calib = manifest.calibration
    origin = (
        f"initialized from `{parent.id or 'a parent model'}` by weight subcloning "
        f"(strategy `{manifest.strategy}`)"
        if manifest.strategy != "random"
        else "randomly initialized with the shape of a subcloned child"
    )
    return f"""---
library_name: transformers
tags: [subclone, weight-subcloning]
---
# {parent.label or parent.id or 'child'} child: {child_shape['layers']} blocks x {child_shape['hidden']}

This model was {origin}. See "Weight subcloning: direct initialization of transformers using larger
pretrained ones" (arXiv:2312.09299). It is an initialization meant for further training.

| size | parent | child |
|---|---|---|
{rows}

- Removed blocks: {manifest.removed_blocks or 'none'}
- Weight scaling by sqrt(fan-in ratio): {'on' if manifest.scale else 'off'}
- Residual ranking: {manifest.residual_score or '-'}; least-squares refit: {'on' if manifest.refit else 'off'}
- Calibration: {calib.tokens if calib else 0} tokens of `{calib.data if calib else '-'}`
- Parent weights sha256: `{parent.weights_sha256 or 'unknown'}`
{_plan_line(manifest.plan)}{_training_line(manifest.training)}
{_licence_line(parent.licence)}`subclone.json` records the kept residual dimensions, heads and FFN neurons of every block.

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


def _plan_line(plan: dict | None) -> str:
    """The resolved plan the child was made by, as `subclone make` printed it ("" in older manifests)."""
    if not plan or not plan.get("line"):
        return ""
    return f"- Plan: `{plan['line'].removeprefix('plan: ')}`\n"


def _training_line(training: TrainingInfo | None) -> str:
    """One line on the training a saved candidate received, or nothing for a freshly made child."""
    if training is None:
        return ""
    steps = "?" if training.steps_done is None else training.steps_done
    return f"- Trained after initialization: {steps} steps (see `subclone.json`)\n"
