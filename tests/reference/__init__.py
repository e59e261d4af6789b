"""Independent reference model of Kubernetes NetworkPolicy v1, used only by tests.

It is written from DESIGN.md §3 and the Kubernetes API reference, never from netfence's
compiler, so that agreement between the two means something.
"""
