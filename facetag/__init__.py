"""facetag: find the faces in a photo library and name the people you know.

Every layer of facetag's networks is a custom ``torch.autograd.Function`` with a
hand-written backward pass (see ``facetag.layers``).
"""

__version__ = "0.1.0"
