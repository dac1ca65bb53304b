"""A wheel holds only the packages setup.py lists: every package folder must be listed."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _setup_keywords():
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    # the literal ones (packages, package_dir); ext_modules and cmdclass are code
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg in ("packages", "package_dir")}


def test_every_package_folder_is_listed_in_setup():
    keywords = _setup_keywords()
    listed = set(keywords["packages"])
    package = ROOT / "rematch_fast"
    folders = {".".join(("rematch_fast",) + init.parent.relative_to(package).parts) for init in package.rglob("__init__.py")}
    mapped = {name for name, folder in keywords["package_dir"].items() if (ROOT / folder / "__init__.py").exists()}
    assert folders | mapped <= listed, sorted((folders | mapped) - listed)


def test_the_cpp_extension_is_declared_and_built_by_cmake():
    """setup.py builds rematch_fast._C through CMakeLists.txt, whose module name matches."""
    setup = (ROOT / "setup.py").read_text()
    assert 'Extension("rematch_fast._C"' in setup and "cmdclass" in setup
    assert "pybind11_add_module(_C " in (ROOT / "CMakeLists.txt").read_text()
