"""The launchers, a package so that they and the tests import each other by name.

Each script runs as `python launch/X.py ...` (it then puts the repository on sys.path itself) or
`python -m launch.X ...`. Owners: common.py (stdlib only: flags and the config check shared by
every launcher), search.py (the in-process runs and the validation search of reproduce.py,
powered.py and science.py).
"""
