"""Packages for setuptools (everything else is in pyproject.toml).

``conf/`` (the Hydra configs) stays at the top of the clone, where the apps read it in place; in a built
wheel or a plain ``pip install .`` it travels as the package ``harness.conf`` (``package-dir`` in
pyproject.toml), so the console scripts find their configs from any directory.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["attentions*", "tasks*", "harness*"]), "harness.conf"])
