"""The operator: the only code that talks to the API server."""
