"""Build of hcd_fast: the Python package, the Triton kernels (``kernels/`` installed as
``hcd_fast.kernels``) and, from issue #4 on, the C++/CUDA extension ``hcd_fast._C``."""
from setuptools import setup

setup(
    packages=["hcd_fast", "hcd_fast.ops", "hcd_fast.distill", "hcd_fast.kernels"],
    package_dir={"hcd_fast.kernels": "kernels"},
)
