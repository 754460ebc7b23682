"""Data sets: text (`TokenData`) and images (`ImageData`), and data files shipped inside installed packages.

Kept apart from `subclone_core.sources` (parents) so that the task registry can name its data factories
without importing the parent loaders that depend on it.
"""
