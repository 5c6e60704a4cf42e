"""Stand-in for torchvision in the MONAI Label test environment (CPU torch 2.13.0).

MONAI Label 0.8.5 imports `torchvision.utils.make_grid` and `save_image` at module level
(monailabel/transform/post.py) but calls them only for 2D image dumps, never on the bundle
app's inference path. The torchvision wheel for torch 2.13.0 on PyPI (0.28.0) is a CUDA build:
its `_C.so` links libtorch_cuda / libc10_cuda, so on the CPU build of torch `import torchvision`
fails (`operator torchvision::nms does not exist`). No CPU wheel is on PyPI, hence this
stand-in; it says what it is as soon as anything uses it.
"""

__version__ = "0.28.0+cpu-stand-in"
STAND_IN = True
