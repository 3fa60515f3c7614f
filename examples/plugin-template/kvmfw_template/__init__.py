"""A template kvmfw plugin package: the ``scratch`` device, the ``exit-counter`` hook
plugin and the ``template-pc`` board (see pyproject.toml for their entry points)."""

KVMFW_PLUGIN_API = (1, 0)
"""The kvmfw plugin API this package is written for: the core refuses another major."""
