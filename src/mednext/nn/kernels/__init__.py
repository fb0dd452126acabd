"""The kernels behind the fast path's layers (:mod:`mednext.nn.layers`); the blocks never call them.

- :mod:`~mednext.nn.kernels.cpu`: the channels-last depthwise convolutions with their fast backward,
  and the channels-last group norm, for the CPU;
- :mod:`~mednext.nn.kernels.polyphase`: strided and transposed depthwise convs as stride-1 ones;
- :mod:`~mednext.nn.kernels.fused`: a block's norm, expansion, GELU and compression in one pass (CPU);
- :mod:`~mednext.nn.kernels.cuda_route`: which kernel runs on CUDA (``mednext.config``'s
  ``cuda_route``), with the fall-back from a failing Triton kernel;
- :mod:`~mednext.nn.kernels.triton`: the Triton kernels, loaded by ``cuda_route`` when first needed.
"""
