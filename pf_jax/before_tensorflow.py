"""Imported before TensorFlow: loads triton first where it is installed (torch's CUDA wheels).

TensorFlow's wheels (2.20 and later) load their statically linked LLVM with RTLD_GLOBAL; triton
(3.7 and later) loaded after it binds its own LLVM calls to TensorFlow's copy and the process dies
with a segmentation fault in `triton/knobs.py` (e.g. `import tensorflow; import timm`, or a
torch optimizer created after the input pipeline). Loaded first, both work. Where triton is not
installed (CI, torch's CPU wheels) this costs one `find_spec`.
"""

import importlib.util

if importlib.util.find_spec("triton") is not None:
  import triton  # noqa: F401
