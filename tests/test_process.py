"""Importing densediff changes nothing in the host process; the commands prepare theirs (densediff/process.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import ROOT

# Every module of the package, imported in a fresh interpreter; prints the other modules that pulled in, in order
IMPORT_ALL = """
import importlib, json, pkgutil, sys
import densediff
for info in pkgutil.walk_packages(densediff.__path__, "densediff."):
    importlib.import_module(info.name)
print(json.dumps([name for name in sys.modules if name.split(".")[0] != "densediff"]))
"""

# The process state densediff could change: the environment, the warning filters, torch's threads, the resolvers
STATE = """
def state():
    import os, sys, warnings
    torch = sys.modules.get("torch")
    omegaconf = sys.modules.get("omegaconf")
    return {"environ": dict(os.environ), "filters": [repr(f) for f in warnings.filters],
            "threads": torch.get_num_threads() if torch else None,
            "interop": torch.get_num_interop_threads() if torch else None,
            "resolvers": [n for n in ("densediff_cwd", "densediff_asset", "densediff_tiny_geowizard")
                          if omegaconf and omegaconf.OmegaConf.has_resolver(n)]}
"""

# 1. the package itself before anything else (where thread settings would have to be made); 2. every third-party
# module the package uses, so that what they change on import is in place; 3. every densediff module
COMPARE = STATE + """
import importlib, json, pkgutil, sys
first = state()
import densediff
after_package = state()
for name in json.loads(sys.stdin.read()):
    try:
        importlib.import_module(name)
    except Exception:  # an alias or a module that only imports as part of another: its parent brought it in
        pass
before = state()
for info in pkgutil.walk_packages(densediff.__path__, "densediff."):
    importlib.import_module(info.name)
print(json.dumps({"first": first, "after_package": after_package, "before": before, "after": state()}))
"""


def _python(code: str, stdin: str = "") -> str:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("OMP_", "KMP_", "MALLOC_", "DENSEDIFF_"))}  # as a user's shell has them
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run([sys.executable, "-c", code], input=stdin, env=env, cwd=ROOT, capture_output=True,
                          text=True, check=True, timeout=300).stdout


def test_importing_densediff_and_all_its_modules_changes_nothing_in_the_process():
    others = _python(IMPORT_ALL).splitlines()[-1]
    states = json.loads(_python(COMPARE, others).splitlines()[-1])
    assert states["after_package"] == states["first"]  # `import densediff` before torch: no thread settings
    before, after = states["before"], states["after"]
    assert after["environ"] == before["environ"]
    assert after["filters"] == before["filters"]
    assert (after["threads"], after["interop"]) == (before["threads"], before["interop"])
    assert before["threads"] is not None  # torch was loaded: the comparison covers its settings
    assert after["resolvers"] == [] and before["resolvers"] == []


def test_prepare_process_makes_the_settings_the_commands_need():
    code = STATE + """
import json
from densediff.process import prepare_process
prepare_process()
import torch
print(json.dumps(state()))
"""
    prepared = json.loads(_python(code).splitlines()[-1])
    assert prepared["environ"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert prepared["environ"]["MALLOC_MMAP_THRESHOLD_"] == str(32 << 20)
    assert prepared["resolvers"] == ["densediff_cwd", "densediff_asset", "densediff_tiny_geowizard"]
    assert any("in eval mode" in f for f in prepared["filters"])
