"""Weight subcloning: initialize a smaller transformer from a larger pretrained one (arXiv:2312.09299).

Subpackages, lowest layer first (each imports only the ones above it in this list):
  core/      the pure subcloning code: architecture tables, shapes, rankings, slicing, strategies
  data/      data sets (embedded text, images) as token and pixel batches
  tasks.py   the task registry: what each task trains on and measures
  io/        files and devices: atomic writes, output claims, saving, streaming, GGUF export, placement
  training/  the training engine, evaluation, metrics logs, lr sweeps, iso-loss speedups
  sources/   parents by id (embedded, folders, GGUF, hub, the self-pretrained ViT)
  workflow/  end-to-end steps: measure importance, make and save a child, training jobs
  analysis/  what a parent or child looks like inside: probes, the inspector, shape exploration
  cli/       the `subclone` command line, one module per subcommand
  app/       the Streamlit app's logic (the pages themselves live in pages/)
"""

from subclone_core.core import __version__

__all__ = ["__version__"]
