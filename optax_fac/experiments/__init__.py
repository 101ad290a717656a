"""Reproduction experiments for optax_fac (optional dependencies).

Models (LLaMA, ResNet, ViT), offline data readers, the optimizer-by-name
factory, the train loop with orbax checkpoints, and the helpers behind
``scripts/train.py``, ``scripts/demo.py`` and ``scripts/plot.py``. Needs the
``experiments`` extra (flax, ...); the library itself (``optax_fac``) never
imports this package. Submodules are imported on use.
"""
