"""Loading a script of scripts/ as a module, for the tests of tests/scripts/."""

import importlib.util
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def load_script(name):
    """scripts/<name>.py as a fresh module (scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"ffn_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
