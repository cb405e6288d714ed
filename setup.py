"""Install sid_fast. `kernels/` (Triton kernels and the op registry) installs as `sid_fast.kernels`;
`csrc/` holds the optional C++/CUDA extension sources, built on first use."""

from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
packages = find_packages(include=["sid_fast", "sid_fast.*"])
package_dir = {"sid_fast": "sid_fast"}
if (here / "kernels" / "__init__.py").exists():
    kernel_packages = ["sid_fast.kernels"] + [
        "sid_fast.kernels." + p for p in find_packages(where="kernels")
    ]
    packages += kernel_packages
    package_dir["sid_fast.kernels"] = "kernels"

setup(
    name="sid_fast",
    version="0.1.0",
    description="Score identity Distillation of flow-matching text-to-image transformers into 1-4-step generators",
    long_description=(here / "README.md").read_text() if (here / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=packages,
    package_dir=package_dir,
    package_data={"sid_fast": ["assets/**/*", "presets/*.yaml"], "sid_fast.kernels": ["*.cpp", "*.cu"]},
    include_package_data=True,
    install_requires=["torch", "numpy", "safetensors", "pyyaml", "tqdm"],
    entry_points={"console_scripts": ["sid-fast=sid_fast.cli:main"]},
)
