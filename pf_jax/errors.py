"""The library's error for a bad argument, naming the function and the argument.

Callers that build library objects from their own settings (the trainer's config) map
`(function, arg)` back to the setting that fed it, so no message wording is part of the API.
"""

DASH = "\u2014"  # in every one-line error: `<what>: <value> — <what is allowed>`


class ArgumentError(ValueError):
  """`function`'s argument `arg` is not allowed; the message says what is.

  Attributes:
    function: the function or class that refused it, e.g. "SamSpec", "obf".
    arg: the name of the argument, e.g. "m", "lam".
  """

  def __init__(self, function: str, arg: str, message: str):
    super().__init__(message)
    self.function = function
    self.arg = arg
