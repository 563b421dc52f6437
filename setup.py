"""cryknn: predict each atom's element from its periodic k-nearest-neighbour distances."""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent
REQUIREMENTS = [
    line.strip()
    for line in (HERE / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="cryknn",
    version="0.1.0",
    description="Element prediction from exact periodic k-NN distances (JAX/Flax)",
    long_description=(HERE / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["cryknn", "cryknn.*"]),
    install_requires=REQUIREMENTS,
    extras_require={
        # amd (average-minimum-distance, CC-BY-NC-SA) is a test oracle only;
        # apache-beam runs the dataset builder's DirectRunner test; pyxtal's wheel holds
        # 100 CSD molecular crystals used as real test structures.
        "test": ["pytest>=8", "average-minimum-distance>=1.5", "apache-beam>=2.60", "pyxtal>=1.0"],
        # Peers measured side by side by experiments/bench_*.py.
        "bench": [
            "average-minimum-distance>=1.5", "vesin>=0.3", "pymatgen>=2024.1", "ase>=3.23",
            "pyxtal>=1.0",
        ],
    },
)
