from setuptools import find_packages, setup

setup(
    name="canal-docker",
    version="0.1.0",
    description="Docker network + IPAM plugin: flannel-style VXLAN, Calico-style label policy",
    package_dir={"": "plugin"},
    packages=find_packages("plugin"),
    python_requires=">=3.9",
    install_requires=[
        "flask>=2.2",
        "gunicorn>=20.1",
        "pyroute2>=0.7",
        "docker>=6.0",
        "requests>=2.28",
        "PyYAML>=6.0",
        "prometheus-client>=0.17",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6", "ruff>=0.6", "mypy>=1.10", "types-PyYAML", "types-requests",
                             "matplotlib>=3.5"]},
    entry_points={"console_scripts": ["canal=canal.cli.main:main"]},
)
