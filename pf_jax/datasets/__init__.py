"""Custom TFDS datasets of pf_jax.

Importing this package registers the builders with TFDS, e.g.
`tfds.builder('digits', data_dir=...)`, `tfds.builder('spurious_digits/patch', data_dir=...)`.
"""

from pf_jax.datasets.digits import Digits
from pf_jax.datasets.noisy_digits import NoisyDigits
from pf_jax.datasets.spurious_digits import SpuriousDigits

__all__ = ["Digits", "NoisyDigits", "SpuriousDigits"]
