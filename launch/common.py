"""Pieces shared by the launchers (stdlib only; imported from the scripts' directory)."""
import argparse
import re


def override_to_flag(text):
  """'sam.rho=0.1' (or 'config.sam.rho=0.1', '--config.sam.rho=0.1')."""
  field, sep, value = text.partition("=")
  field = field.strip()
  for prefix in ("--config.", "config."):
    if field.startswith(prefix):
      field = field[len(prefix):]
  if not sep or not re.fullmatch(r"[A-Za-z_][\w]*(\.[\w]+)*", field):
    raise argparse.ArgumentTypeError(
        f"--override expects field=value (e.g. sam.rho=0.1), got {text!r}")
  return f"--config.{field}={value}"
