"""Per-op gradient checks that ship with the package (``facetag gradcheck``).

Each op family registers ``OpCase`` objects in a module of this package
(``facetag/gradcheck/conv.py`` ...). A case runs our op twice:

1. float64, against central finite differences: ``fd_error`` is the largest absolute
   difference between our analytical Jacobian and the numerical one, and
   ``torch.autograd.gradcheck`` must pass with its default tolerances;
2. float32, against the torch.nn twin with a random upstream gradient: ``torch_error`` is
   the largest relative difference over the output and every input gradient.

The test-suite parametrizes over the same cases, so what users run is what CI runs. The
torch.nn twins (references) ship in the package for that reason: `facetag gradcheck` is
a user command, and the proof it prints needs them.
"""

from facetag.gradcheck.core import CaseResult, OpCase, all_cases, run_case, run_cases

__all__ = ["CaseResult", "OpCase", "all_cases", "run_case", "run_cases"]
