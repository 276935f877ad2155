"""n2l: noise to latent, an overfitted image codec that transmits no latent codes.

    import n2l
    buf = n2l.encode("image.png", quality=4)   # bytes
    img = n2l.decode(buf)                       # uint8 [H, W, C]
    n2l.read_header(buf)                        # size, architecture, seed, bpp
"""

from .bitstream import FormatError, Header, read_header
from .decoder import decode
from .encoder import TrainingConfig, encode
from .images import ImageError, load_image, psnr
from .model import PRESETS, ModelConfig, preset

__version__ = "0.2.0"
__all__ = [
    "PRESETS",
    "FormatError",
    "Header",
    "ImageError",
    "ModelConfig",
    "TrainingConfig",
    "decode",
    "encode",
    "load_image",
    "preset",
    "psnr",
    "read_header",
]
