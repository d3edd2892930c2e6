"""finetune_core: one training core for TI, hypernetworks, DreamBooth, DreamArtist and aesthetic gradients.

Importing this package is cheap and safe inside the WebUI: it imports neither `diffusers` nor the WebUI's
`modules`; backends import them lazily.
"""

__version__ = "0.1.0"
