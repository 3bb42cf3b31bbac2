"""tests/mutation_check.py stays in sync with the code (the full mutation run is outside CI)."""

from tests import mutation_check


def test_every_mutation_applies_and_names_existing_tests():
  assert mutation_check.check() == []
  assert len(mutation_check.MUTATIONS) >= 20


def test_check_reports_a_pattern_that_no_longer_occurs():
  gone = mutation_check.Mutation("gone", "pf_jax/train.py", "no such line", "x", ())
  applies = mutation_check.MUTATIONS[0]  # a pattern that exists, with a test that does not
  bad_test = applies._replace(name="bad test", tests=("tests/test_sam.py::test_nope",))
  problems = mutation_check.check((gone, bad_test))
  assert len(problems) == 2 and "0 times" in problems[0] and "does not exist" in problems[1]
