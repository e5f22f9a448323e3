"""Importing the library, or a read-only CLI command, loads no data or plotting stack."""

import subprocess
import sys

HEAVY = ("tensorflow_datasets", "grain", "matplotlib", "tensorflow")
CHECK = ("import sys, {what}; heavy = [m for m in {heavy} if m in sys.modules]; "
         "print('HEAVY', heavy)")


def loaded(what):
    out = subprocess.run([sys.executable, "-c", CHECK.format(what=what, heavy=HEAVY)],
                         capture_output=True, text=True, check=True).stdout
    return next(line for line in out.splitlines() if line.startswith("HEAVY"))


def test_import_jaxckpt_is_light():
    assert loaded("jaxckpt") == "HEAVY []"


def test_the_trainer_still_loads_on_first_use():
    code = "import jaxckpt; print(jaxckpt.Trainer.__module__, 'Trainer' in dir(jaxckpt))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.split() == ["jaxckpt.train", "True"]
