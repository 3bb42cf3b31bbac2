"""Custom TFDS datasets of pf_jax.

Importing this package registers the builders with TFDS, e.g.
`tfds.builder('digits', data_dir=...)`.
"""

from pf_jax.datasets.digits import Digits

__all__ = ["Digits"]
