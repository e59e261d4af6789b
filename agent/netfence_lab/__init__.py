"""`netfence lab`: a flannel-shaped cluster in network namespaces, with real packets."""
