"""The folder that nnU-Net's own commands search for MedNeXt's trainers.

nnunetv2 finds trainers outside its package through the ``nnUNet_extTrainer`` variable: a list of
folders whose modules it imports, looking for the class by name. This folder holds one such
module, :mod:`mednext_trainers`, which hands out the classes of :mod:`mednext.pipeline.trainer`.
``mednext`` points the variable here for its own calls; ``mednext env`` prints the line that does
the same for ``nnUNetv2_*`` commands (:func:`mednext.pipeline.workdir.engine_environment`).
"""
