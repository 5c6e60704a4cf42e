"""The two names MONAI Label imports from torchvision.utils; neither runs in bundle inference."""


def _unavailable(name: str):
    def call(*args, **kwargs):
        raise NotImplementedError(f"torchvision.utils.{name}: this environment has a torchvision stand-in "
                                  f"(no CPU torchvision wheel for torch 2.13.0 on PyPI); install a CPU build of "
                                  f"torchvision 0.28 to use it")

    call.__name__ = name
    return call


make_grid = _unavailable("make_grid")
save_image = _unavailable("save_image")
