"""medvox: 3D classification of medical volumes, done correctly, fast and reproducibly."""

__version__ = "0.1.0"
