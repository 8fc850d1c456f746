"""The node's HTTP service on twisted.web: one module per resource."""
