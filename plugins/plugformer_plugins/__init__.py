"""plugformer's built-in components, one subpackage per kind. Each subpackage is an entry
point of the ``plugformer`` group and registers its components exactly as a third-party
plugin would, through the public API of ``plugformer``."""
