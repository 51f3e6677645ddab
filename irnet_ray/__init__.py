"""irnet-ray: pixel-accurate pseudo masks from image-level labels (IRNet, CVPR 2019) on Ray."""

__version__ = "0.1.0"
