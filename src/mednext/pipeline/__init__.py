"""Planning, preprocessing, training, prediction and evaluation on nnU-Net v2 datasets.

The engine is the ``nnunetv2`` package (install ``mednext[pipeline]``); modules here import it
lazily so that ``mednext.nn`` stays torch-only.
"""
