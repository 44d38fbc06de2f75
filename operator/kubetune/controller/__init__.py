"""The kopf operator: the only code that talks to the API server."""
