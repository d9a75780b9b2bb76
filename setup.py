"""conf/ (the Hydra config groups) stays at the top of the clone and ships inside the wheel as
idmap/conf, where idmap.paths finds it when idmap runs outside a clone. Everything else is in
pyproject.toml."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPy(build_py):
    def run(self):
        super().run()
        # An editable install reads the clone's conf/ in place (idmap.paths), so it gets no copy.
        if not self.editable_mode:
            conf = Path(__file__).resolve().parent / "conf"
            for path in conf.rglob("*.yaml"):
                target = Path(self.build_lib) / "idmap" / "conf" / path.relative_to(conf)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, target)


setup(cmdclass={"build_py": BuildPy})
