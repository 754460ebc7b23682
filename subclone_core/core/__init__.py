"""The pure core of subcloning: state_dict in, state_dict out.

Architecture tables (archs/), target shapes, importance calibration, selection of what to keep, slicing,
building a child and the strategies that combine them. Nothing here imports the rest of the project
(tests/test_layering.py checks it): only torch, transformers, safetensors, accelerate, numpy and the stdlib.
"""

__version__ = "0.1.0"
