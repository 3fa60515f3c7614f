"""kvmfw-x86: the x86-64 architecture plugin for kvmfw (gem5's ``X86KvmCPU``, rebuilt)."""

KVMFW_PLUGIN_API = (1, 0)
__version__ = "0.1.0"
