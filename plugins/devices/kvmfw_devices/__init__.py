"""kvmfw-devices: the device models a real guest needs, published as ``kvmfw.devices`` entry
points (the entry-point name is the ``--device`` name).

Each device lives in a module named after the hardware, with its register map cited in the
module docstring; :mod:`kvmfw_devices.boards` lists the default boards.
"""

KVMFW_PLUGIN_API = (1, 0)

__version__ = "0.1.0"
