"""kvmfw-armv8: the ARMv8 (arm64) architecture plugin of kvmfw."""

KVMFW_PLUGIN_API = (1, 0)
__version__ = "0.1.0"
