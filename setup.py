"""Packaging that pyproject.toml cannot declare with automatic package discovery.

``conf/`` and ``slurm/`` stay at the top of the repository, one copy of each file, and ship
inside the wheel as the data packages ``orchestrator/_conf`` and ``launch/_slurm`` (a
package-dir mapping), beside every package ``find_packages`` sees, so a package added later
is never left out of the wheel. Code finds them through ``orchestrator.resources``.
"""

from setuptools import find_packages, setup

DATA_PACKAGES = {"orchestrator._conf": "conf", "launch._slurm": "slurm"}

setup(
    packages=find_packages(include=["orchestrator*", "launch*"]) + list(DATA_PACKAGES),
    package_dir=DATA_PACKAGES,
)
