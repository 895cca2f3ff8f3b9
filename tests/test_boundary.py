"""Architecture boundaries: the core never pulls in a WebUI (or Gradio) module."""

import subprocess
import sys

HOST_MODULES = ("modules", "backend", "ldm", "sgm", "ldm_patched", "modules_forge", "gradio")


def test_core_imports_no_host_module():
    code = ("import sys, loratorio.core; "
            f"print([m for m in sys.modules if m.split('.')[0] in {HOST_MODULES!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_probe_would_see_a_host_import(tmp_path):
    """Guard against a check that cannot fail: a fake host module imported alongside is reported."""
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules" / "__init__.py").write_text("")
    code = ("import sys, loratorio.core, modules; "
            f"print([m for m in sys.modules if m.split('.')[0] in {HOST_MODULES!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": f"{tmp_path}:."}).stdout
    assert "modules" in out
